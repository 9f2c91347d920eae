"""Config files and `--config.FIELD=VALUE` overrides, read the same way by every command.

One rule for every field, whoever sets it (the train and eval command lines, an eval config
file, a config's size table): a field the config does not have is refused in one sentence
with the closest real name, so a misspelt override never runs with the default silently; a
text field keeps what was typed (a folder named 2024 stays "2024"); a tuple field takes a list
or a single number; a value of the wrong type is refused in one sentence.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence

import ml_collections

OVERRIDE_PREFIX = "--config."


def read_config_file(spec: str, module_name: str):
    """(path, the config returned by get_config(ARG)) of PATH.py, for a spec PATH[.py][:ARG]."""
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


def apply_overrides(config: ml_collections.ConfigDict, items: Sequence[str]) -> ml_collections.ConfigDict:
    """Sets each `--config.FIELD=VALUE` of a command line, VALUE read as a Python literal."""
    for item in items:
        if not item.startswith(OVERRIDE_PREFIX) or "=" not in item:
            raise ValueError(f"unrecognised argument {item!r} (config fields are set as --config.FIELD=VALUE)")
        key, _, text = item[len(OVERRIDE_PREFIX):].partition("=")
        set_field(config, key, parse_value(text), f"{OVERRIDE_PREFIX}{key}", typed=text)
    return config


def override(config: ml_collections.ConfigDict, values: Mapping, where: str = "config") -> ml_collections.ConfigDict:
    """Sets fields named by dotted paths ({"data.batch_size": 64, ...}) in place; returns the config."""
    for key, value in values.items():
        set_field(config, key, value, where)
    return config


def parse_value(text: str):
    """A Python literal (3, 1e-4, True, (1, 5), [...]) or, when it is none, the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(config: ml_collections.ConfigDict, key: str, value, where: str, typed: str | None = None) -> None:
    """Sets the dotted field `key`; `typed` is the text a value was read from, kept for text fields."""
    fields = dict(_fields(config))
    if key not in fields:
        raise ValueError(f"{where}: unknown config field {key!r}{_did_you_mean(key, fields)}")
    current = fields[key]
    if isinstance(current, str) and not isinstance(value, str) and typed is not None:
        value = typed
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    elif isinstance(current, tuple) and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, ml_collections.ConfigDict) and not isinstance(current, ml_collections.ConfigDict):
        value = value.to_dict()
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    try:
        node[leaf] = value
    except TypeError as error:
        raise ValueError(f"{where}: config field {key!r} cannot be set to {value!r} ({error})") from None


def _did_you_mean(key: str, fields: Mapping) -> str:
    close = difflib.get_close_matches(key, list(fields), n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    parent = key.rpartition(".")[0]
    siblings = sorted(name for name in fields if name.rpartition(".")[0] == parent)
    return f"; the fields{f' of {parent}' if parent else ''} are {', '.join(siblings)}"


def _fields(config, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Every field by dotted name, nested configs included (as themselves and field by field)."""
    for name, value in config.items():
        yield f"{prefix}{name}", value
        if isinstance(value, ml_collections.ConfigDict):
            yield from _fields(value, f"{prefix}{name}.")
