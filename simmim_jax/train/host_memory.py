"""Host-memory allocator setting for CPU-only runs: freed buffers stay mapped and are reused, not re-faulted.

XLA:CPU allocates every step's temporary and output buffers with the C library's `malloc` and frees them
when the step ends. glibc hands them back to the kernel: a large block (above a threshold that starts at
128 KiB and grows to at most 32 MiB) is an `mmap` that `free` unmaps, and the extra arenas that glibc gives
XLA's worker threads (64 MiB heaps) are unmapped once they fall empty, whatever the trim threshold. The
next step touches brand-new pages, so the kernel page-faults and zeroes each 4 KiB page again, every step:
on the tiny ViT train step that is about 161,000 faults and 0.45 CPU-seconds of kernel time per step
(`minor_faults_per_step` / `sys_s_per_step` of `benchmarks/train_throughput.py --no_host_memory_defaults`,
BENCHMARKS.md).

`keep_freed_memory()` sets glibc's `mallopt` so that freed memory stays with the process: one arena for all
threads (`M_ARENA_MAX=1`), no `mmap` for large blocks (`M_MMAP_MAX=0`: they come from the heap) and no
trimming of the heap (`M_TRIM_THRESHOLD=-1`, which mallopt(3) documents as "disables trimming completely";
a finite threshold such as 2 GiB still trimmed the ViT-B/16 step's heap every step). Steady-state steps
then fault no pages. The price: the process keeps its peak host memory until it exits, and heap
fragmentation raises that peak (maximum RSS: tiny ViT step 1.1 -> 1.5 GB, ViT-B/16 at batch 8 3.8 -> 5.8 GB),
and all threads share one arena's lock.

Two conditions, both handled by `configure_for_cpu_only()`:
- It must run before the process starts a second thread: glibc fixes the arena limit when a second thread
  first allocates, and threads keep the arena they started with. So the command-line tools call it first
  thing, before JAX, TensorFlow or any thread pool exists (`simmim_jax/cli.py`).
- It is for CPU-only runs. On GPU / TPU hosts the step's buffers live on the accelerator, and many tf.data
  threads allocating through one arena could slow the input pipeline; that was not measured, so the
  setting stays off there. A JAX process can only have an accelerator backend through a plugin (the
  `jax_plugins` entry points or namespace, or `libtpu`), so "CPU only" is: `JAX_PLATFORMS=cpu`, or no such
  plugin installed.

It changes nothing on other C libraries (macOS, musl). PyTorch has the same default allocator on Linux:
`benchmarks/train_throughput.py --compare torch` gives its PyTorch worker the same setting through
`GLIBC_TUNABLES` (`GLIBC_TUNABLES_KEEP_FREED` below), so that the comparison stays like for like.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform

# glibc's <malloc.h> parameter numbers for mallopt().
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NO_TRIMMING = -1  # M_TRIM_THRESHOLD=-1: glibc stores it as SIZE_MAX, i.e. never trim

# The same setting for a child process, through the dynamic loader's tunables (read at process start; the
# tunable is a size_t, so "never" is its largest value).
GLIBC_TUNABLES_KEEP_FREED = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                             f"glibc.malloc.trim_threshold={2**64 - 1}")


def is_glibc() -> bool:
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory mapped (see the module docstring); True if the C library took it.

  Call it before the process starts a second thread."""
  if not is_glibc():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  # mallopt returns 1 on success, 0 on error.
  return all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIMMING)))


def accelerator_plugins() -> list[str]:
  """The installed packages through which JAX could get a non-CPU backend (without importing JAX)."""
  found = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  (a namespace package: no code runs)
    found += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return sorted(set(found))


def cpu_only(environ=None) -> bool:
  """Whether this process's JAX can only run on the CPU: `JAX_PLATFORMS=cpu`, or no accelerator plugin."""
  environ = os.environ if environ is None else environ
  platforms = [p.strip().lower() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms == ["cpu"]
  return not accelerator_plugins()


def configure_for_cpu_only(environ=None) -> bool:
  """`keep_freed_memory()` when `cpu_only()`; True if it was applied. Call it before any thread starts."""
  return cpu_only(environ) and keep_freed_memory()
