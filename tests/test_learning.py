"""The tiny CLIP really learns the synthetic tree of life: held-out species zero-shot.

Held-out species never appear in training; naming them zero-shot only works through
the taxonomy (shared genus/family, epithets seen on other genera). The fast check
runs in the default suite; the slow one is the README's main job at full length.
"""

import pytest

from bioclip_jax.train.job import run_job
from train_helpers import smoke_config


def _held_out_scores(workdir, **overrides):
    last = run_job(smoke_config("", eval__text_type="taxon_com,com", eval__every_steps=0, **overrides),
                   str(workdir))
    return last["eval/chance_top1"], last["eval/taxon_com/zero_shot_top1"], last["eval/com/zero_shot_top1"]


def test_held_out_species_zero_shot_beats_chance_quickly(tmp_path):
    # Measured: 50% (taxon_com) and 46% (com) against 12.5% chance after 60 steps.
    chance, taxon_com, common = _held_out_scores(
        tmp_path, total_steps=60, data__batch_size=64, schedule__warmup_steps=10, log_every_steps=20,
        checkpoint__every_steps=1000, data__synthetic__species=32, data__synthetic__images_per_species=12,
        data__synthetic__held_out_species=8)
    assert chance == pytest.approx(12.5)
    assert taxon_com >= 2.5 * chance
    assert common >= 2.0 * chance  # common-name queries work because text types were mixed


@pytest.mark.slow
def test_main_job_held_out_zero_shot_is_far_above_chance(tmp_path):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        "synthetic_tiny", os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    last = run_job(config, str(tmp_path))
    chance = last["eval/chance_top1"]
    assert last["eval/taxon_com/zero_shot_top1"] >= 5 * chance
    assert last["eval/com/zero_shot_top1"] >= 4 * chance
