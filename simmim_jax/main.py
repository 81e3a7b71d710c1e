"""Command-line entry points (thin: flags, platform setup, one call).

  simmim-pretrain --config=configs/demo.py --workdir=DIR [--config.key=value ...]
  python -m simmim_jax.main --config=configs/demo.py --workdir=DIR
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from simmim_jax import host_memory  # imports nothing that starts a thread

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an ml-collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and images; "
                               "rerunning with the same workdir resumes.")
# Multi-process runs: Cloud TPU VM slices, SLURM and Open MPI are detected; elsewhere pass all three.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (jax.distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (jax.distributed).")


def _parse_flags(argv):
  """absl's flag parsing, with a one-line error for a config override naming an unknown key (the
  configs are locked) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    key = str(e).strip("\"'")
    print(f"configuration error: unknown config key {key!r} in {', '.join(overrides)}: every --config.KEY must be "
          "a field of the config file (see its get_config and simmim_jax/default_config.py)", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"configuration error: {e}", file=sys.stderr)
    sys.exit(2)


def _load_config():
  """The --config file with its overrides; a missing or broken file exits with a message."""
  try:
    config = _CONFIG.value
    config.keys()  # a config file that failed to load raises on first use
    return config
  except (OSError, SyntaxError, AttributeError) as e:
    print(f"configuration error: cannot load --config: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


def _start_distributed():
  """jax.distributed, before any backend starts."""
  from simmim_jax import distributed  # pylint: disable=g-import-not-at-top

  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    print(f"configuration error: {e}", file=sys.stderr)
    sys.exit(2)


# The one exit policy of every command: bad input or config 2, runtime failure 1, preempted 143.
EXIT_BAD_INPUT, EXIT_FAILURE = 2, 1


def run_program(program: str, train) -> None:
  """Runs `train()` and turns the errors a user can act on into one line and the exit status:
  a config or input the run refuses -> 2; a run that stopped (data, non-finite values, a failed write) -> 1;
  preempted after saving -> 143. Anything else is a bug: its traceback is kept."""
  from simmim_jax import checkpoint, data, pretrain, validation  # pylint: disable=g-import-not-at-top
  from simmim_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  try:
    train()
  except (validation.ConfigError, workdir_lib.WorkdirBusyError) as e:
    print(f"{program}: configuration error: {_one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  except pretrain.Preempted as e:
    print(f"{program}: {e}", flush=True)
    sys.exit(pretrain.PREEMPTED_EXIT_CODE)
  except (pretrain.NonFiniteError, FloatingPointError, checkpoint.CheckpointWriteError, data.DataError) as e:
    print(f"{program}: stopped: {_one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_FAILURE)


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split())


def _run_recipe(module_name: str, program: str):
  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import importlib  # pylint: disable=g-import-not-at-top  (after flag parsing, so --help stays fast)

    logging.set_verbosity(logging.INFO)
    _start_distributed()
    module = importlib.import_module(f"simmim_jax.{module_name}")
    run_program(program, lambda: module.train_and_evaluate(_load_config(), _WORKDIR.value))

  return run


def _prepare_process():
  """Process-wide settings that must precede every thread: the host allocator of CPU-only runs
  (simmim_jax/host_memory.py; JAX, TensorFlow and their thread pools are imported after this)."""
  host_memory.configure_for_cpu_only()


def pretrain_main():
  """simmim-pretrain --config=configs/demo.py --workdir=DIR [--config.key=value ...]"""
  _prepare_process()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_run_recipe("pretrain", "simmim-pretrain"), flags_parser=_parse_flags)


def finetune_main():
  """simmim-finetune --config=configs/finetune/demo.py --workdir=DIR [--config.pretrained=PRETRAIN_WORKDIR]"""
  _prepare_process()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_run_recipe("finetune", "simmim-finetune"), flags_parser=_parse_flags)


def linear_probe_main():
  """simmim-linear-probe --config=configs/linear_probe/demo.py --workdir=DIR [--config.pretrained=...]"""
  _prepare_process()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_run_recipe("linear_probe", "simmim-linear-probe"), flags_parser=_parse_flags)


if __name__ == "__main__":
  pretrain_main()
