"""Default XLA flags that the command-line entry points add (the library itself never touches XLA_FLAGS).

XLA reads `XLA_FLAGS` once, when the first backend starts, so `apply_defaults` must run before anything
asks JAX for a device. A flag the user already set in `XLA_FLAGS` is never overridden.

The defaults only change the XLA:CPU compiler (GPU and TPU ignore them). Each was measured, A/B in
separate processes on the real tiny train step (`benchmarks/xla_cpu_flags.py`, BENCHMARKS.md):
  --xla_cpu_experimental_ynn_fusion_type=   YNNPACK library fusions off: +14-24% img/s on this 2-core AVX2
      machine with jaxlib 0.12 (XLA's own matmul path is faster here for the transformer's shapes); others
      also turn it off as a workaround for YNNPACK miscompilations reported against jaxlib 0.11.
Measured and *not* adopted: +eltwise / +reduce YNN fusion (slower), oneDNN, XNNPACK dot / graph fusion
(slower than YNN off), fast-math (no gain over YNN off, and it relaxes IEEE semantics).
"""

import os
import warnings

CPU_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def with_defaults(xla_flags: str, defaults: tuple[str, ...] = CPU_DEFAULTS) -> str:
  """`xla_flags` plus every default whose flag name it does not set already."""
  present = {token.split("=", 1)[0] for token in xla_flags.split()}
  added = [flag for flag in defaults if flag.split("=", 1)[0] not in present]
  return " ".join([xla_flags.strip(), *added]).strip()


def apply_defaults(environ=None) -> str:
  """Adds the defaults to `environ["XLA_FLAGS"]` (default: os.environ); returns the new value."""
  environ = os.environ if environ is None else environ
  if environ is os.environ and _backends_started():
    warnings.warn("simmim_jax.xla_flags.apply_defaults: a JAX backend is already running, so XLA_FLAGS "
                  "changes have no effect in this process")
  environ["XLA_FLAGS"] = with_defaults(environ.get("XLA_FLAGS", ""))
  return environ["XLA_FLAGS"]


def _backends_started() -> bool:
  """Whether a JAX backend already runs (a private JAX function: False if it ever disappears)."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False
