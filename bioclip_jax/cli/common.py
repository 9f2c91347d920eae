"""What the commands share: model-source flags, config files, and how an error becomes one line and an exit status."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence

from bioclip_jax import console, exit_codes
from bioclip_jax.config_fields import OVERRIDE_PREFIX, apply_overrides, read_config_file
from bioclip_jax.sources import RANDOM, SOURCES_HELP, is_source


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one spelling per flag, --kebab-case, and the console flags -q/-v, applied as parsed.

    The old spellings (--snake_case, and those in `renamed`, such as --out for --output) are
    still accepted for one release: each one used is read as its new spelling, with a one-line
    note on stderr. `--config.FIELD=VALUE` overrides name config fields, not flags, and are left as they are.
    """

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})
        console.add_arguments(self)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        parsed, extras = super().parse_known_args([self._new_spelling(arg) for arg in args], namespace)
        console.apply(parsed)
        return parsed, extras

    def _old_spellings(self) -> dict[str, str]:
        old = {"--" + flag[2:].replace("-", "_"): flag for action in self._actions for flag in action.option_strings
               if flag.startswith("--") and "-" in flag[2:]}
        return {**old, **self.renamed}

    def _new_spelling(self, arg: str) -> str:
        if not arg.startswith("--") or arg.startswith(OVERRIDE_PREFIX):
            return arg
        flag, equals, value = arg.partition("=")
        new = self._old_spellings().get(flag)
        if new is None:
            return arg
        print(f"{self.prog}: {flag} is now spelt {new}; the old spelling goes in the next release", file=sys.stderr)
        return new + equals + value


def add_model_args(parser: ArgumentParser, required: bool = False) -> None:
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


class InputError(Exception):
    """The command line, or what it names, is wrong: exit status USAGE, not ERROR."""


@contextlib.contextmanager
def reading_inputs() -> Iterator[None]:
    """A ValueError raised while a command reads its arguments and inputs is a usage or input error."""
    try:
        yield
    except ValueError as error:
        raise InputError(str(error)) from error


def exit_status(error: Exception) -> int:
    """USAGE for a usage or input error (a missing file or source is one), ERROR for a failed run."""
    return exit_codes.USAGE if isinstance(error, (InputError, FileNotFoundError)) else exit_codes.ERROR


def run_cli(body, argv, command: str = "error") -> int:
    """Runs a CLI body; the library's clear errors become one line `COMMAND: ...` and their exit status."""
    try:
        return int(body(argv) or 0)
    except (InputError, FileNotFoundError, ValueError, ImportError) as error:
        print(f"{command}: {error}", file=sys.stderr)
        return exit_status(error)


def load_train_config(spec: str, overrides: Sequence[str] = ()):
    """configs/NAME.py[:ARG] with `--config.FIELD=VALUE` overrides, as the train and plan commands read them."""
    _, config = read_config_file(spec, "_bioclip_train_config")
    return apply_overrides(config, overrides)
