"""Command-line entry points (thin: flags, platform setup, one call).

  simmim-pretrain --config=configs/demo.py --workdir=DIR [--config.key=value ...]
  python -m simmim_jax.main --config=configs/demo.py --workdir=DIR
"""

import re
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
  """absl's flag parsing, with one line and exit 2 for a config override naming an unknown key (the configs
  are locked) instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    print(f"configuration error: {unknown_key_message(e, argv)}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"configuration error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)


def unknown_key_message(error: Exception, argv: list[str]) -> str:
  """'unknown config key --config.a.b (did you mean --config.a.c?)' from ml-collections' KeyError /
  AttributeError, naming only the offending override and the closest valid key when there is one."""
  text = str(error.args[0]) if error.args else str(error)
  first, _, rest = text.replace("\\n", "\n").partition("\n")  # ml-collections nests reprs: \\n or \n
  key = first.replace("\\", "").strip().strip("\"'")
  overrides = [a[2:].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  offending = next((o for o in overrides if o.split(".")[-1] == key), f"config.{key}")
  message = f"unknown config key --{offending}"
  suggestion = re.search(r'Did you mean "([^"]+)"', rest)
  if suggestion:
    message += f" (did you mean --{offending.rsplit('.', 1)[0]}.{suggestion.group(1)}?)"
  return message + ": every --config.KEY must be a field of the config file"


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
