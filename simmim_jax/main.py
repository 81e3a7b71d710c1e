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


def _pretrain(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from simmim_jax import pretrain  # after flag parsing, so --help stays fast

  logging.set_verbosity(logging.INFO)
  try:
    pretrain.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except pretrain.ConfigError as e:
    print(f"simmim-pretrain: configuration error: {e}", file=sys.stderr)
    sys.exit(2)


def pretrain_main():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_pretrain)


if __name__ == "__main__":
  pretrain_main()
