"""The `bioclip-jax` entry point reaches every command, and each answers --help."""

import pytest

from bioclip_jax.cli import main as cli


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_has_help(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--" in out  # an options listing


def test_usage_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in cli.COMMANDS)
