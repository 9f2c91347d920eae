"""`python -m bioclip_jax.evaluate`: the same command as `bioclip-jax eval` (bioclip_jax/cli/eval.py)."""

import sys

from bioclip_jax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
