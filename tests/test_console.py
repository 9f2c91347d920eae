"""Output goes through `logging`: library code never prints, every command takes -q and -v, and
those choose which of the library's lines a command shows (docs/console.md)."""

import ast
import logging
import pathlib

import pytest
from PIL import Image

from bioclip_jax import console
from bioclip_jax.cli import embed as embed_cli
from bioclip_jax.cli import eval as eval_cli
from bioclip_jax.cli import main as cli
from bioclip_jax.cli import predict as predict_cli
from bioclip_jax.cli.common import ArgumentParser
from bioclip_jax.data.eval_sources import open_eval_data
from bioclip_jax.train.metrics import MetricsWriter

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "bioclip_jax"


def test_library_modules_never_print():
    """Only the commands (cli/) write to the console themselves; the library logs."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "cli":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert found == []


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_takes_quiet_and_verbose(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "-q, --quiet" in out and "-v, --verbose" in out


def _library_lines(tmp_path) -> None:
    """One line at each level from library code: the training progress line (INFO), a dataset's
    empty class folder (WARNING) and what the dataset opened as (DEBUG)."""
    MetricsWriter(tmp_path / "workdir", total_steps=10).progress(1, {"loss": 2.5})
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "Corvus corax" / "a.png")
    open_eval_data(f"folder:{tmp_path / 'images'}")


@pytest.fixture
def images(tmp_path):
    (tmp_path / "images" / "Corvus corax").mkdir(parents=True)
    (tmp_path / "images" / "empty").mkdir()
    return tmp_path


PROGRESS, SKIPPED, DETAIL = "step 1/10 | loss 2.5", "class directory", "1 images in 1 classes"


@pytest.mark.parametrize("flags, shown, hidden", [
    ([], [PROGRESS, SKIPPED], [DETAIL]),
    (["-q"], [SKIPPED], [PROGRESS, DETAIL]),
    (["--verbose"], [PROGRESS, SKIPPED, DETAIL], []),
])
def test_the_console_flags_choose_the_lines(flags, shown, hidden, images, capsys):
    ArgumentParser(prog="x").parse_args(flags)
    _library_lines(images)
    captured = capsys.readouterr()
    out_and_err = captured.out + captured.err
    assert [line for line in shown if line not in out_and_err] == []
    assert [line for line in hidden if line in out_and_err] == []
    assert PROGRESS not in captured.err and SKIPPED not in captured.out  # information on stdout, warnings on stderr


def test_quiet_turns_progress_bars_off():
    """Whichever way a command spells its switch: eval's config field, predict's `progress`, embed's `no_progress`."""
    assert eval_cli.build_config([]).progress and not eval_cli.build_config(["-q"]).progress
    assert predict_cli.build_parser().parse_args(["a.jpg"]).progress
    assert not predict_cli.build_parser().parse_args(["a.jpg", "-q"]).progress
    embed_args = ["--text-file=t.txt", "--output=e.npy"]
    assert not embed_cli._parser().parse_args(embed_args).no_progress
    assert embed_cli._parser().parse_args([*embed_args, "-q"]).no_progress


def test_quiet_and_verbose_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        ArgumentParser(prog="x").parse_args(["-q", "-v"])
    assert exit_.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_a_library_user_gets_the_logging_defaults(images, capsys, monkeypatch):
    """Without the commands' console: warnings on stderr, nothing at INFO until logging is set up."""
    logger, root = logging.getLogger(console.LOGGER), logging.getLogger()
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(root, "handlers", [])  # absl's, when a test imported it
    levels = logger.level, root.level
    logger.setLevel(logging.NOTSET)  # setLevel, not setattr: it also clears the loggers' cached decisions
    root.setLevel(logging.WARNING)
    try:
        _library_lines(images)
    finally:
        logger.setLevel(levels[0])
        root.setLevel(levels[1])
    captured = capsys.readouterr()
    assert captured.out == "" and SKIPPED in captured.err and PROGRESS not in captured.err
