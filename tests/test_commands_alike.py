"""Every command spells its flags one way, --kebab-case, and writes where --output says; the old
spellings still work for one release, each with a one-line note."""

import re

import pytest

from bioclip_jax.cli import eval as eval_cli
from bioclip_jax.cli import main as cli
from bioclip_jax.cli import train as train_cli
from bioclip_jax.cli.common import ArgumentParser

COMMANDS = list(cli.COMMANDS)
WRITE_FILES = ["eval", "predict", "embed", "embed-taxa", "export", "import", "make-synthetic", "make-shards",
               "convert-shards"]


def _flags(command: str, capsys) -> set[str]:
    assert cli.main([command, "--help"]) == 0
    return set(re.findall(r"(?<![\w.-])--[a-z][a-z0-9_-]*", capsys.readouterr().out))


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_is_kebab_case(command, capsys):
    flags = _flags(command, capsys)
    assert flags and not [flag for flag in flags if "_" in flag]


@pytest.mark.parametrize("command", WRITE_FILES)
def test_every_output_is_named_by_output(command, capsys):
    flags = _flags(command, capsys)
    assert "--output" in flags and "--out" not in flags


def test_old_spellings_still_work_with_a_note(capsys):
    args, rest = train_cli.build_parser().parse_known_args(
        ["--config=c.py", "--workdir=w", "--stop_after=3", "--allow_config_change", "--config.total_steps=7"])
    assert args.stop_after == 3 and args.allow_config_change and rest == ["--config.total_steps=7"]
    config = eval_cli.build_config(["--out=r.json", "--text_type", "com", "--config.text_batch_size=8"])
    assert (config.out, config.text_type, config.text_batch_size) == ("r.json", "com", 8)
    note = "bioclip-jax {}: {} is now spelt {}; the old spelling goes in the next release"
    assert capsys.readouterr().err.splitlines() == [
        note.format("train", "--stop_after", "--stop-after"),
        note.format("train", "--allow_config_change", "--allow-config-change"),
        note.format("eval", "--out", "--output"), note.format("eval", "--text_type", "--text-type")]


def test_a_config_override_and_a_positional_are_left_as_they_are(capsys):
    parser = ArgumentParser(prog="x", renamed={"--out": "--output"})
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--output")
    args, rest = parser.parse_known_args(["a_b", "--config.out=1", "--output=o"])
    assert args.paths == ["a_b"] and args.output == "o" and rest == ["--config.out=1"]
    assert capsys.readouterr().err == ""
