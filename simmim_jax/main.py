"""`python -m simmim_jax.main` = simmim-pretrain. The command-line programs live in `simmim_jax/cli.py`.

  python -m simmim_jax.main --config=demo --workdir=DIR [--config.key=value ...]
"""

import sys

from simmim_jax.cli import finetune_main, linear_probe_main, pretrain_main

__all__ = ["pretrain_main", "finetune_main", "linear_probe_main"]

if __name__ == "__main__":
  sys.exit(pretrain_main())
