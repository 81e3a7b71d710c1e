"""The host allocator setting of the command-line tools (simmim_jax/train/host_memory.py): XLA:CPU step buffers
are reused instead of being page-faulted afresh each step."""

import json
import sys

import pytest

from simmim_jax.train import host_memory
from helpers import run_process

# Runs a jitted step with a 64 MiB temporary (sin(x), the operand of a matmul) and a tiny output, as a
# train step allocates and frees its activations inside one execution, and counts the minor page faults of
# the process over the last 16 of 32 calls (the heap reaches its size in the first few; a later call may
# still grow it once in a while, under load more often).
_FAULTS_SCRIPT = """
import json, os, resource, sys
from simmim_jax.train import host_memory
threads_before = len(os.listdir("/proc/self/task"))
applied = host_memory.configure_for_cpu_only() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
w = jnp.ones((4096, 8), jnp.float32)
step = jax.jit(lambda x, w: jnp.sum(jnp.sin(x) @ w))
faults = []
for _ in range(32):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x, w).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "threads_before": threads_before, "faults": faults,
                  "faults_per_call": sum(faults[-16:]) / 16}))
"""


def _faults_per_call(mode: str, **env) -> dict:
  proc = run_process([sys.executable, "-c", _FAULTS_SCRIPT, mode], timeout=300, unset=("GLIBC_TUNABLES",),
                     env={"JAX_PLATFORMS": "cpu", **env})
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not host_memory.is_glibc(), reason="the setting is glibc's")
def test_freed_step_buffers_are_reused_instead_of_faulted_again():
  pages_per_call = 64 * 2**20 // 4096  # the 64 MiB temporary in 4 KiB pages
  default = _faults_per_call("default")
  kept = _faults_per_call("keep")
  # The same setting given to a child process through the loader (as the PyTorch benchmark worker gets it).
  tunables = _faults_per_call("default", GLIBC_TUNABLES=host_memory.GLIBC_TUNABLES_KEEP_FREED)
  assert kept["applied"] and not default["applied"]
  assert kept["threads_before"] == 1  # importing simmim_jax.train.host_memory starts no thread
  # glibc's default: every call maps (and the kernel zeroes) its temporary anew.
  assert default["faults_per_call"] > 0.9 * pages_per_call, default
  # Kept: the freed block is reused; at most one call in four grows the heap (observed: none to one in eight).
  assert kept["faults_per_call"] < 0.25 * pages_per_call, kept
  assert tunables["faults_per_call"] < 0.25 * pages_per_call, tunables


def test_no_op_off_glibc(monkeypatch):
  monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
  assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("jax_platforms,plugins,expected", [
    ("cpu", ["jax_cuda12_plugin"], True),  # explicitly CPU, whatever is installed
    ("cuda", [], False), ("cpu,tpu", [], False), ("tpu", ["libtpu"], False),
    ("", [], True),  # nothing but the CPU backend can start
    ("", ["jax_cuda12_plugin"], False), ("", ["libtpu"], False)])
def test_cpu_only(monkeypatch, jax_platforms, plugins, expected):
  monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: plugins)
  assert host_memory.cpu_only({"JAX_PLATFORMS": jax_platforms}) is expected


def test_configure_applies_only_when_cpu_only(monkeypatch):
  calls = []
  monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(1) or True)
  monkeypatch.setattr(host_memory, "accelerator_plugins", lambda: ["libtpu"])
  assert host_memory.configure_for_cpu_only({}) is False and not calls
  assert host_memory.configure_for_cpu_only({"JAX_PLATFORMS": "cpu"}) is True and calls == [1]


@pytest.mark.parametrize("entry", ["pretrain_main", "finetune_main", "linear_probe_main"])
def test_cli_entry_points_configure_the_allocator_before_anything_runs(monkeypatch, entry):
  from simmim_jax import cli  # pylint: disable=g-import-not-at-top

  events = []
  monkeypatch.setattr(host_memory, "configure_for_cpu_only", lambda: events.append("allocator"))
  monkeypatch.setattr(cli, "_run", lambda *args, **kwargs: events.append("flags and run"))
  getattr(cli, entry)()
  assert events == ["allocator", "flags and run"]
