"""Small training runs on a tiny synthetic tree of life, shared by the training tests."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from bioclip_jax.train.loop import train
from bioclip_jax.train.metrics import read_metrics

CONFIG_FILE = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_tiny.py")


def smoke_config(shards: str, **overrides):
    spec = importlib.util.spec_from_file_location("synthetic_tiny", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.data.train_shards = shards
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def run(workdir, shards: str, stop_after=None, **overrides) -> list[dict]:
    train(smoke_config(shards, **overrides), str(workdir), stop_after=stop_after)
    return read_metrics(str(workdir))


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def as_array(records: list[dict]) -> np.ndarray:
    by_step = losses(records)
    return np.array([by_step[s] for s in sorted(by_step)])
