"""Small training runs on a tiny synthetic tree of life, shared by the training tests."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bioclip_jax.config_fields import override, read_config_file
from bioclip_jax.synthetic.dataset import make_synthetic
from bioclip_jax.train.loop import train
from bioclip_jax.train.metrics import read_metrics

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.py")


def make_shards(out) -> str:
    """A 24-species synthetic tree of life at 64 px in `out`; returns its training shards' folder
    (the held-out species are in out/held_out)."""
    make_synthetic(str(out), species=24, images_per_species=6, held_out_species=4, seed=3, image_size=64,
                   samples_per_shard=40)
    return os.path.join(str(out), "train")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Training shards of make_shards (import it into a test module)."""
    return make_shards(tmp_path_factory.mktemp("synthetic"))


def smoke_config(shards: str, **overrides):
    _, config = read_config_file(f"{CONFIG_FILE}:smoke", "synthetic_tiny")
    config.data.train_shards = shards
    return override(config, {dotted.replace("__", "."): value for dotted, value in overrides.items()})


def run(workdir, shards: str, stop_after=None, **overrides) -> list[dict]:
    train(smoke_config(shards, **overrides), str(workdir), stop_after=stop_after)
    return read_metrics(str(workdir))


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def as_array(records: list[dict]) -> np.ndarray:
    by_step = losses(records)
    return np.array([by_step[s] for s in sorted(by_step)])
