"""The README's main job, end to end: synthetic data -> train -> held-out zero-shot -> export."""

import json

import open_clip
import pytest

from bioclip_jax import create_model
from bioclip_jax.train.job import run_job
from bioclip_jax.train.metrics import read_metrics
from openclip_helpers import random_inputs, relative_error, torch_features
from train_helpers import smoke_config


def _job_config(**overrides):
    settings = dict(total_steps=8, eval__every_steps=4, eval__text_type="taxon_com,com",
                    data__synthetic__species=16, data__synthetic__images_per_species=4,
                    data__synthetic__held_out_species=4)
    return smoke_config("", **{**settings, **overrides})


def test_main_job_generates_trains_evaluates_and_exports(tmp_path, capsys):
    run_job(_job_config(), str(tmp_path))
    out = capsys.readouterr().out
    assert "held-out species, zero-shot top-1" in out and "| com |" in out
    records = read_metrics(str(tmp_path))
    evals = [r for r in records if "eval/taxon_com/zero_shot_top1" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["eval/chance_top1"] == pytest.approx(25.0)
    for rank in ("genus", "family", "kingdom"):
        assert 0.0 <= evals[-1][f"eval/com/zero_shot_top1_{rank}"] <= 100.0

    export = tmp_path / "open_clip"
    config = json.loads((export / "open_clip_config.json").read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 64
    reference = open_clip.create_model(f"local-dir:{export}").eval()
    ours = create_model(None, str(tmp_path))  # the training workdir's latest checkpoint
    images, tokens = random_inputs(64, batch=2)
    ref_image, ref_text = torch_features(reference, images, tokens)
    assert relative_error(ours.encode_image(images), ref_image) < 1e-5
    assert relative_error(ours.encode_text(tokens), ref_text) < 1e-5

    # Rerunning a finished job resumes at its last step: nothing is trained again.
    before = len(records)
    run_job(_job_config(), str(tmp_path))
    assert [r for r in read_metrics(str(tmp_path))[before:] if "loss" in r] == []
