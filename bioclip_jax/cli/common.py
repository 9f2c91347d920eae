"""Argument conventions shared by the CLIs: model sources and config files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bioclip_jax.config_fields import apply_overrides, read_config_file
from bioclip_jax.sources import RANDOM, SOURCES_HELP, is_source


def add_model_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--pretrained", required=required, default=None,
                        help=SOURCES_HELP + "; omitted with --model NAME = random weights")
    parser.add_argument("--model", default=None,
                        help="architecture name (e.g. ViT-B-16), read from the source when it has one; "
                             "as in open_clip, also a source (hf-hub:ORG/NAME)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random initialisation")


def model_source(pretrained: str | None, model: str | None, default: str | None = None) -> tuple[str | None, str]:
    """(architecture name, source) for `create_model` from a command line's --pretrained/--model:
    --pretrained, else a --model that is a source, else 'random' weights of a bare architecture
    name, else `default`."""
    if pretrained:
        return (None if is_source(model) else model), pretrained
    if is_source(model):
        return None, model
    if model:
        return model, RANDOM
    if default:
        return None, default
    raise ValueError(f"no model given: pass --pretrained=SRC ({SOURCES_HELP})")


def run_cli(body, argv) -> int:
    """Runs a CLI body, turning the library's clear errors into one line and exit status 1."""
    try:
        return int(body(argv) or 0)
    except (FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def load_train_config(spec: str, overrides: Sequence[str] = ()):
    """configs/NAME.py[:ARG] with `--config.FIELD=VALUE` overrides, as the train and plan commands read them."""
    _, config = read_config_file(spec, "_bioclip_train_config")
    return apply_overrides(config, overrides)
