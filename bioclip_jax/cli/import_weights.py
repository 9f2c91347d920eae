"""`bioclip-jax import --pretrained SRC --output CKPT [--model NAME]`: open_clip weights -> bioclip_jax.

SRC and CKPT may be local or in a bucket (gs://bucket/x).
"""

from __future__ import annotations

import sys

from bioclip_jax.cli.common import ArgumentParser, run_cli
from bioclip_jax.sources import SOURCES_HELP


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax import", description=__doc__, renamed={"--out": "--output"})
    parser.add_argument("--pretrained", required=True, help=SOURCES_HELP + "; a .bin/.pt file needs torch")
    parser.add_argument("--model", default=None,
                        help="architecture (e.g. ViT-B-16-quickgelu); read from open_clip_config.json when present")
    parser.add_argument("--output", required=True, help="bioclip_jax checkpoint directory to write")
    return parser


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    from bioclip_jax.pretrained import create_model, save_model  # noqa: PLC0415 - jax: keep --help fast
    model = create_model(args.model, args.pretrained)
    save_model(model, args.output)
    print(f"wrote bioclip_jax checkpoint {args.output}")
    return 0


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
