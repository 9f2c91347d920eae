"""The `bioclip-jax` entry point reaches every command, and each answers --help."""

import subprocess
import sys

import pytest
from PIL import Image

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


def test_a_command_exiting_with_a_message_prints_it(monkeypatch, capsys):
    """SystemExit("message") (how cli/common.py refuses a missing model) is shown, not swallowed."""
    import types

    module = types.SimpleNamespace(main=lambda argv: (_ for _ in ()).throw(SystemExit("error: give --pretrained")))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_module", "a command that exits with a message"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: module)
    assert cli.main(["fake"]) == 2
    assert "error: give --pretrained" in capsys.readouterr().err


def test_export_says_which_step_it_exported(tmp_path, capsys):
    import json

    import bioclip_jax
    from bioclip_jax.checkpoint import model_dir
    from bioclip_jax.models.params import flat_params
    from bioclip_jax.pretrained import model_metadata

    workdir = tmp_path / "run"
    model_dir.write_model_json(str(workdir), *model_metadata(bioclip_jax.create_model("ViT-Tiny-8", seed=1)))
    for step, seed in ((10, 1), (20, 2)):
        model_dir.save_params(str(workdir / "checkpoints" / str(step)),
                              flat_params(bioclip_jax.create_model("ViT-Tiny-8", seed=seed)))
    assert cli.main(["export", "--checkpoint", str(workdir), "--output", str(tmp_path / "latest")]) == 0
    assert f"from step 20 of {workdir}" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(workdir), "--step", "10", "--output", str(tmp_path / "ten")]) == 0
    assert f"from step 10 of {workdir}" in capsys.readouterr().out
    assert json.loads((tmp_path / "ten" / "open_clip_config.json").read_text())["model_cfg"]


def _with_reader_gone(*args: str) -> subprocess.CompletedProcess:
    """Runs `bioclip-jax ARGS` with stdout a pipe whose reader has already left (as `| head` does)."""
    process = subprocess.Popen([sys.executable, "-m", "bioclip_jax.cli.main", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    _, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, "", err)


def test_a_reader_that_leaves_early_ends_the_output_quietly(tmp_path):
    """`bioclip-jax predict ... | head`: no BrokenPipeError traceback, the status of a SIGPIPE'd tool."""
    for i in range(2):
        Image.new("RGB", (20, 20), (100 * i, 0, 0)).save(tmp_path / f"{i}.jpg")
    for args in (["--help"], ["predict", "--pretrained", "random", "--model", "ViT-Tiny-8", "--cls", "crow,raven",
                              "--no-progress", str(tmp_path)]):
        result = _with_reader_gone(*args)
        assert "BrokenPipe" not in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 141, (args, result.returncode, result.stderr)


def test_hub_warnings_are_printed_once(monkeypatch):
    """huggingface_hub has its own stderr handler; absl gives the root logger another one. Each handler's
    emissions are counted, not stderr read: the hub's handler holds whatever sys.stderr was when
    huggingface_hub was first imported, which under pytest is an earlier test's capture."""
    import logging

    from huggingface_hub.utils import logging as hub_logging

    class Counting(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    hub_handler, root_handler = Counting(), Counting()
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "handlers", [hub_handler])
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "propagate", True)
    monkeypatch.setattr(logging.getLogger(), "handlers", [root_handler])
    assert cli.main([]) == 0 and cli.main(["predict", "--help"]) == 0
    hub_logging.get_logger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
    assert hub_handler.messages + root_handler.messages == ["Retrying in 1s [Retry 1/5]."]


def test_loading_a_training_workdir_says_nothing_about_orbax_metadata(tmp_path, caplog, capsys):
    """A training run's CheckpointManager keeps _CHECKPOINT_METADATA per step, not in params/: Orbax's
    warning that params/ lacks one came with every load of a workdir."""
    from bioclip_jax.checkpoint import model_dir
    from workdir_helpers import trained_workdir

    workdir = tmp_path / "run"
    tree = trained_workdir(workdir, step=10)
    caplog.set_level("WARNING")
    assert cli.main(["export", "--checkpoint", str(workdir), "--output", str(tmp_path / "out")]) == 0
    assert "from step 10" in capsys.readouterr().out
    assert model_dir.param_keys(str(workdir)) == sorted(tree)
    assert not [r.getMessage() for r in caplog.records if "Metadata file" in r.getMessage()]


def test_readme_lists_every_command():
    import re
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (listing,) = re.findall(r"Command line \(`bioclip-jax --help` lists them all\): (.*?)\.\n", readme, re.S)
    assert re.findall(r"`([a-z-]+)`", listing) == list(cli.COMMANDS)
