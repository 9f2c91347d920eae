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
    assert cli.main(["export", "--checkpoint", str(workdir), "--out", str(tmp_path / "latest")]) == 0
    assert f"from step 20 of {workdir}" in capsys.readouterr().out
    assert cli.main(["export", "--checkpoint", str(workdir), "--step", "10", "--out", str(tmp_path / "ten")]) == 0
    assert f"from step 10 of {workdir}" in capsys.readouterr().out
    assert json.loads((tmp_path / "ten" / "open_clip_config.json").read_text())["model_cfg"]
