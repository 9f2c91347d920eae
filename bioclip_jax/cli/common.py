"""Argument conventions shared by the CLIs: model sources and config files."""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Sequence

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


def read_config_file(spec: str, module_name: str):
    """The config returned by get_config(ARG) of PATH.py, for a spec PATH[.py][:ARG]."""
    path, _, arg = spec.partition(".py:")
    path = path if path.endswith(".py") else path + ".py"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path} (from {os.getcwd()}); give an existing "
                                f"file, e.g. --config=configs/synthetic_tiny.py")
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config(arg=None)")
    return path, (module.get_config(arg) if arg else module.get_config())


def load_train_config(spec: str, overrides: Sequence[str] = ()):
    """configs/NAME.py[:ARG] with `--config.FIELD=VALUE` overrides, as the train binary and plan read them.

    A field the config does not have is refused by name (with the closest real name), so a
    misspelt override never trains with the default silently.
    """
    _, config = read_config_file(spec, "_bioclip_train_config")
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r} (config fields are set as --config.FIELD=VALUE)")
        key, _, text = item[len("--config."):].partition("=")
        _set_field(config, key, text)
    return config


def _set_field(config, key: str, text: str) -> None:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    fields = dict(_flat_items(config))
    if key not in fields:
        raise ValueError(f"--config.{key}: the training config has no field {key!r}{_did_you_mean(key, fields)}")
    if isinstance(fields[key], str) and not isinstance(value, str):
        value = text  # a string field keeps what was typed (a folder named 2024, say)
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    try:
        node[leaf] = value
    except TypeError as err:
        raise ValueError(f"--config.{key}={text}: {err}") from None


def _did_you_mean(key: str, fields) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    return f"; did you mean {close[0]!r}?" if close else "; the fields are listed in bioclip_jax/train/config_base.py"


def _flat_items(config, prefix: str = ""):
    for name, value in config.items():
        if hasattr(value, "items"):
            yield from _flat_items(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value
