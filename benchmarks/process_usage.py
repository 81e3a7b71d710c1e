"""Per-step resource use of this process (standard library only: imported by the JAX benchmarks and by the
PyTorch worker, which runs in another interpreter)."""

import resource


def rusage_per_step(before, after, num_steps: int) -> dict:
  """Between two `resource.getrusage(RUSAGE_SELF)` readings: minor page faults, kernel (system) CPU seconds
  (the host allocator's cost: simmim_jax/train/host_memory.py) and all CPU seconds (user + system, summed over
  threads), each per step."""
  return {"minor_faults": (after.ru_minflt - before.ru_minflt) / num_steps,
          "sys_s": (after.ru_stime - before.ru_stime) / num_steps,
          "cpu_s": (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / num_steps}


def reading():
  return resource.getrusage(resource.RUSAGE_SELF)
