"""The README's main job, end to end: synthetic data -> train -> held-out zero-/few-shot -> results files -> export."""

import json
import os

import open_clip
import pytest

from bioclip_jax import create_model
from bioclip_jax.cli import eval as eval_cli
from bioclip_jax.evaluate import results
from bioclip_jax.train.job import run_job
from bioclip_jax.train.metrics import read_metrics
from openclip_helpers import random_inputs, relative_error, torch_features
from train_helpers import smoke_config


def _job_config(**overrides):
    """The main job's config (its learning rate and schedule) at test size: 32 species, 8 of them held out."""
    settings = dict(total_steps=60, data__batch_size=64, schedule__warmup_steps=10, log_every_steps=20,
                    checkpoint__every_steps=30, eval__every_steps=30, eval__text_type="taxon_com,com",
                    data__synthetic__species=32, data__synthetic__images_per_species=12,
                    data__synthetic__held_out_species=8)
    return smoke_config("", **{**settings, **overrides})


def test_main_job_generates_trains_evaluates_and_exports(tmp_path, capsys):
    run_job(_job_config(), str(tmp_path))
    out = capsys.readouterr().out
    eval_lines = [line for line in out.splitlines() if line.startswith("eval step")]
    assert [line.split()[2] for line in eval_lines] == ["30", "60"], out  # one line per evaluation
    assert "held_out: zero-shot top-1 taxon_com" in eval_lines[0] and " com " in eval_lines[0]
    assert "1-shot" in eval_lines[0] and "(chance 12.5%)" in eval_lines[0]
    assert "| held_out | com |" in out  # the results table
    records = read_metrics(str(tmp_path))
    evals = [r for r in records if "eval/taxon_com/zero_shot_top1" in r]
    assert [r["step"] for r in evals] == [30, 60]

    # It learns: held-out species, never trained on, are named zero-shot far above chance, by their
    # taxonomy and by common names (the text types were mixed in training). Measured on a 2-core AMD EPYC:
    # zero-shot taxon_com 35%, com 42%, 1-shot 64% against chance 12.5%.
    final = evals[-1]
    chance = final["eval/chance_top1"]
    assert chance == pytest.approx(12.5)
    assert final["eval/taxon_com/zero_shot_top1"] >= 2 * chance, final
    assert final["eval/com/zero_shot_top1"] >= 2 * chance, final
    assert final["eval/1_shot_top1"] >= 4 * chance, final
    for text_type in ("taxon_com", "com"):  # a species right is its genus right, and so on up the tree
        by_rank = [final[f"eval/{text_type}/zero_shot_top1"]]
        by_rank += [final[f"eval/{text_type}/zero_shot_top1_{rank}"] for rank in ("genus", "family", "kingdom")]
        assert by_rank == sorted(by_rank), by_rank

    # Results files, as the eval binary writes them, of the final evaluation (step 60).
    held_out = os.path.join(str(tmp_path), "synthetic", "held_out")
    about = results.read_about(str(tmp_path / "results.json"))
    assert about["model"] == {"source": str(tmp_path), "step": 60, "architecture": "ViT-Tiny-8"}
    assert (about["text_types"], about["templates"], about["shots"]) == (["taxon_com", "com"], "openai", [1, 5])
    assert about["datasets"] == [{"name": "held_out", "source": f"folder:{held_out}/images",
                                  "path": f"{held_out}/images", "taxa": f"{held_out}/taxa.csv",
                                  "classes": 8, "images": 96}]
    final = {(r.metric, r.text_type): r.mean for r in results.read_json(str(tmp_path / "results.json"))}
    for text_type in ("taxon_com", "com"):
        assert final[("zero_shot_top1", text_type)] == pytest.approx(evals[-1][f"eval/{text_type}/zero_shot_top1"],
                                                                     abs=1e-3)
        assert ("zero_shot_top1_family", text_type) in final
    assert ("1_shot_top1", "") in final and ("1_shot_top1_genus", "") in final and ("5_shot_top1", "") in final
    assert "| held_out | taxon_com |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 1000

    # `eval --workdir` with no --data scores the held-out set the run recorded; 20-shot, with 12 images per
    # held-out species, is skipped, not fatal.
    assert eval_cli.main(["--workdir", str(tmp_path), "--tasks=few_shot", "--shots=1,20", "--trials=2", "--no_plot",
                          "--no_progress", f"--out={tmp_path / 'again' / 'results.json'}"]) == 0
    again = results.read_about(str(tmp_path / "again" / "results.json"))
    assert again["datasets"][0]["path"] == f"{held_out}/images" and again["model"]["step"] == 60
    shots = {r.metric for r in results.read_json(str(tmp_path / "again" / "results.json"))}
    assert "1_shot_top1" in shots and "20_shot_top1" not in shots

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
