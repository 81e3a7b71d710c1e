"""`python -m simmim_jax.main` = simmim-pretrain. The command-line programs live in `simmim_jax/cli.py`.

  python -m simmim_jax.main --config=demo --workdir=DIR [--config.key=value ...]
"""

import sys

from simmim_jax import cli

if __name__ == "__main__":
  sys.exit(cli.pretrain_main())
