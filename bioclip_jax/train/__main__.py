"""`python -m bioclip_jax.train`: the same command as `bioclip-jax train` (bioclip_jax/cli/train.py)."""

import sys

from bioclip_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
