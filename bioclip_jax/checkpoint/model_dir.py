"""A bioclip_jax model directory: architecture + preprocessing JSON and Orbax parameters.

Layout:
  DIR/bioclip_jax_model.json    {"model_cfg": <open_clip model_cfg>, "preprocess_cfg": {...}}
  DIR/params/                   Orbax checkpoint of {"visual.transformer.blocks.attn.query": [layers, ...], ...}
A training workdir has the same JSON and, instead of `params/`, an Orbax
CheckpointManager folder `checkpoints/<step>/params`; loading picks the latest step.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp

MODEL_JSON = "bioclip_jax_model.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"


def path_to_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def key_to_path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def write_model_json(directory: str, model_cfg: dict, preprocess_cfg: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, MODEL_JSON)
    with open(target + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    os.replace(target + ".tmp", target)


def read_model_json(directory: str) -> dict[str, Any]:
    with open(os.path.join(directory, MODEL_JSON), encoding="utf-8") as f:
        return json.load(f)


def is_model_dir(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MODEL_JSON))


def save_params(directory: str, params: Mapping[tuple, Any]) -> None:
    """Orbax writes to a temporary folder and renames it, so a crash leaves no half checkpoint."""
    target = os.path.abspath(os.path.join(directory, PARAMS_DIR))
    tree = {path_to_key(p): np.asarray(v) for p, v in params.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(target, tree, force=True)


def latest_step_dir(directory: str) -> str | None:
    root = os.path.join(directory, CHECKPOINTS_DIR)
    if not os.path.isdir(root):
        return None
    steps = [int(d) for d in os.listdir(root) if re.fullmatch(r"\d+", d)
             and os.path.isdir(os.path.join(root, d, PARAMS_DIR))]
    return os.path.join(root, str(max(steps))) if steps else None


def load_params(directory: str) -> dict[tuple, np.ndarray]:
    """Parameters of a model directory, or of the latest checkpoint of a training workdir."""
    source = directory
    if not os.path.isdir(os.path.join(directory, PARAMS_DIR)):
        step_dir = latest_step_dir(directory)
        if step_dir is None:
            raise FileNotFoundError(f"{directory} has neither {PARAMS_DIR}/ nor a finished checkpoint "
                                    f"under {CHECKPOINTS_DIR}/")
        source = step_dir
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(os.path.abspath(os.path.join(source, PARAMS_DIR)))
    return {key_to_path(k): np.asarray(v) for k, v in tree.items()}
