"""`python -m bioclip_jax.evaluate`: see bioclip_jax/evaluate/cli.py."""

import sys

from bioclip_jax.evaluate.cli import main

if __name__ == "__main__":
    sys.exit(main())
