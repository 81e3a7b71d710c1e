"""Command-line entry points (thin: flags, platform setup, one call).

  simmim-pretrain --config=configs/demo.py --workdir=DIR [--config.key=value ...]
  python -m simmim_jax.main --config=configs/demo.py --workdir=DIR
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images; "
                               "rerunning with the same workdir resumes.")
# Multi-process runs: Cloud TPU VM slices, SLURM and Open MPI are detected; elsewhere pass all three.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (jax.distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (jax.distributed).")


def _start_distributed():
  from simmim_jax import distributed  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f"configuration error: {e}", file=sys.stderr)
    sys.exit(2)


def _pretrain(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from simmim_jax import pretrain  # after flag parsing, so --help stays fast

  logging.set_verbosity(logging.INFO)
  _start_distributed()
  try:
    pretrain.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except pretrain.ConfigError as e:
    print(f"simmim-pretrain: configuration error: {e}", file=sys.stderr)
    sys.exit(2)
  except pretrain.Preempted as e:
    print(f"simmim-pretrain: {e}", flush=True)
    sys.exit(pretrain.PREEMPTED_EXIT_CODE)


def pretrain_main():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_pretrain)


def _run_downstream(module_name: str, program: str):
  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import importlib  # pylint: disable=g-import-not-at-top
    from simmim_jax import pretrain  # pylint: disable=g-import-not-at-top

    logging.set_verbosity(logging.INFO)
    _start_distributed()
    module = importlib.import_module(f"simmim_jax.{module_name}")
    try:
      module.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except pretrain.ConfigError as e:
      print(f"{program}: configuration error: {e}", file=sys.stderr)
      sys.exit(2)

  return run


def finetune_main():
  """simmim-finetune --config=configs/finetune/demo.py --workdir=DIR [--config.pretrained=PRETRAIN_WORKDIR]"""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_run_downstream("finetune", "simmim-finetune"))


def linear_probe_main():
  """simmim-linear-probe --config=configs/linear_probe/demo.py --workdir=DIR [--config.pretrained=...]"""
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_run_downstream("linear_probe", "simmim-linear-probe"))


if __name__ == "__main__":
  pretrain_main()
