"""A resumed run keeps its config: changes to what is learned are refused, changes to how it runs pass."""

import fnmatch
import json
import os

import pytest

from bioclip_jax.checkpoint.model_dir import CONFIG_JSON
from bioclip_jax.config_fields import read_config_file
from bioclip_jax.train import run_identity
from bioclip_jax.train.config_base import base_config

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.py")


def smoke():
    return read_config_file(f"{CONFIG_FILE}:smoke", "synthetic_tiny")[1]


def saved_as_trainer_writes_it(config) -> dict:
    return json.loads(config.to_json_best_effort(indent=2))


def test_unchanged_config_has_no_changes():
    config = smoke()
    assert run_identity.check_resumed_config(saved_as_trainer_writes_it(config), smoke(), False) == []


def test_changing_what_is_learned_is_refused_with_a_diff():
    saved = saved_as_trainer_writes_it(smoke())
    now = smoke()
    now.data.batch_size = 32
    now.optimizer.lr = 3e-4
    now.model.name = "ViT-Tiny-8-quickgelu"
    now.total_steps = 12  # allowed, and not listed among the refused
    with pytest.raises(ValueError) as error:
        run_identity.check_resumed_config(saved, now, allow_changes=False)
    message = str(error.value)
    assert "data.batch_size: 16 -> 32" in message
    assert "optimizer.lr: 0.001 -> 0.0003" in message
    assert 'model.name: "ViT-Tiny-8" -> "ViT-Tiny-8-quickgelu"' in message
    assert "total_steps" not in message
    assert "--allow-config-change" in message and "new --workdir" in message


def test_changing_how_the_run_runs_is_accepted():
    saved = saved_as_trainer_writes_it(smoke())
    now = smoke()
    now.total_steps = 600
    now.checkpoint.every_steps = 50
    now.eval.every_steps = 10
    now.mesh.fsdp = 2
    changes = run_identity.check_resumed_config(saved, now, allow_changes=False)
    assert [str(c) for c in changes] == ["checkpoint.every_steps: 3 -> 50", "eval.every_steps: 0 -> 10",
                                         "mesh.fsdp: 1 -> 2", "total_steps: 6 -> 600"]


def test_a_field_missing_from_the_saved_config_is_a_change():
    saved = saved_as_trainer_writes_it(smoke())
    del saved["loss"]["kind"]
    with pytest.raises(ValueError, match=r'loss.kind: \(absent\) -> "softmax"'):
        run_identity.check_resumed_config(saved, smoke(), allow_changes=False)


def test_allowed_change_is_accepted_and_recorded_with_its_history(tmp_path):
    first = smoke()
    (tmp_path / CONFIG_JSON).write_text(first.to_json_best_effort(indent=2))
    second = smoke()
    second.optimizer.lr = 3e-4
    saved = json.loads((tmp_path / CONFIG_JSON).read_text())
    changes = run_identity.check_resumed_config(saved, second, allow_changes=True)
    run_identity.record_config_change(tmp_path, second, changes, step=3)

    third = smoke()
    third.optimizer.lr = 3e-4
    third.data.batch_size = 32
    saved = json.loads((tmp_path / CONFIG_JSON).read_text())
    changes = run_identity.check_resumed_config(saved, third, allow_changes=True)
    assert [c.field for c in changes] == ["data.batch_size"]  # compared with the config in force, not the first
    run_identity.record_config_change(tmp_path, third, changes, step=5)

    assert json.loads((tmp_path / CONFIG_JSON).read_text()) == saved_as_trainer_writes_it(third)
    history = run_identity.read_config_history(tmp_path)
    assert [(h["step"], h["changes"]) for h in history] == [
        (3, {"optimizer.lr": [0.001, 0.0003]}), (5, {"data.batch_size": [16, 32]})]
    run_identity.check_resumed_config(json.loads((tmp_path / CONFIG_JSON).read_text()), third, False)


def test_allow_list_names_real_fields():
    fields = run_identity.flatten(base_config().to_dict())
    for pattern in run_identity.ALLOWED_CHANGES:
        assert any(fnmatch.fnmatchcase(field, pattern) for field in fields), pattern
