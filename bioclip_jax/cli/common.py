"""Argument conventions shared by the CLIs: model sources and config files."""

from __future__ import annotations

import argparse
import importlib.util
import os


def add_model_args(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--pretrained", required=required, default=None,
                        help="local-dir:PATH (open_clip folder), a .safetensors/.bin state dict, "
                             "or a bioclip_jax checkpoint/workdir; omitted = random weights")
    parser.add_argument("--model", default=None,
                        help="architecture name (e.g. ViT-B-16); read from the source when it has one")
    parser.add_argument("--seed", type=int, default=0, help="seed for random initialisation")


def load_model(args: argparse.Namespace):
    from bioclip_jax.pretrained import create_model  # noqa: PLC0415 - keep --help fast
    if args.pretrained is None and args.model is None:
        raise SystemExit("error: give --pretrained SRC or --model NAME")
    return create_model(args.model or "ViT-B-16", args.pretrained, seed=args.seed)


def run_cli(body, argv) -> int:
    """Runs a CLI body, turning the library's clear errors into one line and exit status 1."""
    try:
        return int(body(argv) or 0)
    except (FileNotFoundError, ValueError, ImportError) as err:
        import sys  # noqa: PLC0415
        print(f"error: {err}", file=sys.stderr)
        return 1


def read_config_file(spec: str, module_name: str):
    """The config returned by get_config(ARG) of PATH.py, for a spec PATH[.py][:ARG]."""
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg=None)")
    return path, (module.get_config(arg) if arg else module.get_config())
