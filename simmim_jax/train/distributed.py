"""One place that starts `jax.distributed`, per platform, before anything touches the devices.

  * explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (GPU clusters without a
    scheduler, and N local CPU processes on 127.0.0.1 — the multi-host code path on one machine);
  * Cloud TPU VM slices with more than one worker, SLURM jobs and Open MPI (`mpirun`) launches with more than
    one task: `jax.distributed.initialize()` without arguments, which detects the cluster;
  * anything else (one host): nothing.

Every process logs; only process 0 writes metrics, images and the config (see `pretrain.py`).
"""

import os

import jax
from absl import logging


def detect_cluster(environ=None) -> str | None:
  """The multi-process launcher this process runs under, or None for a single process."""
  env = os.environ if environ is None else environ
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu"
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, initialization_timeout: int = 300) -> str:
  """Starts jax.distributed if this is a multi-process run; returns how ("explicit", "tpu", "slurm",
  "openmpi" or "single")."""
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise ValueError("--coordinator_address, --num_processes and --process_id must be given together; got "
                       f"{coordinator_address!r}, {num_processes!r}, {process_id!r}")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=initialization_timeout)
    how = "explicit"
  else:
    how = detect_cluster()
    if how is None:
      return "single"
    jax.distributed.initialize(initialization_timeout=initialization_timeout)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  return how
