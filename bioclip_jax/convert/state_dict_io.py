"""Reading and writing open_clip weights without torch (safetensors + numpy).

A `.bin`/`.pt` pickle needs torch to read; it is loaded with `weights_only=True`
only when torch happens to be installed, and never imported otherwise.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# open_clip's own preference order for weights inside a folder.
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                 "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """An open_clip state dict from `.safetensors` (numpy) or `.bin`/`.pt`/`.pth` (needs torch)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        return dict(load_file(path))
    if path.endswith((".bin", ".pt", ".pth")):
        try:
            import torch  # noqa: PLC0415 - optional, only for pickled PyTorch checkpoints
        except ImportError:
            raise ImportError(
                f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), "
                f"or convert it to .safetensors first") from None
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
            checkpoint = checkpoint["state_dict"]
        return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
                for k, v in checkpoint.items() if hasattr(v, "detach")}
    raise ValueError(f"unrecognised weights file {path}: expected .safetensors, .bin, .pt or .pth")


def find_weights_in_dir(directory: str) -> str:
    for name in _WEIGHT_FILES:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    found = sorted(f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin", ".pth", ".pt")))
    if not found:
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin, *.pth) in {directory}")
    return os.path.join(directory, found[0])


def read_open_clip_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{CONFIG_NAME} not found in {directory} (needed for the architecture)")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "model_cfg" not in config:
        raise ValueError(f"{path} has no 'model_cfg' entry")
    return config


def write_open_clip_dir(directory: str, model_cfg: dict, preprocess_cfg: dict,
                        state_dict: dict[str, np.ndarray]) -> None:
    """An open_clip hf-hub folder: loads with `open_clip.create_model_and_transforms('local-dir:DIR')`.

    Files are written under temporary names and renamed, so an interrupted export never
    leaves a config next to half-written weights.
    """
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, WEIGHTS_NAME)
    config = os.path.join(directory, CONFIG_NAME)
    save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, weights + ".tmp",
              metadata={"format": "pt"})
    with open(config + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    os.replace(weights + ".tmp", weights)
    os.replace(config + ".tmp", config)
