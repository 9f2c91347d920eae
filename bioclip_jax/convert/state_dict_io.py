"""Reading and writing open_clip weights without torch (safetensors + numpy).

A `.bin`/`.pt` pickle needs torch to read; it is loaded with `weights_only=True`
only when torch happens to be installed, and never imported otherwise. Folders and
files may be local or in a bucket (`gs://...`, see bioclip_jax.paths).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import safetensors
import safetensors.numpy
from etils import epath

from bioclip_jax import paths

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
# open_clip's own preference order for weights inside a folder.
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth",
                 "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _read_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        if paths.is_remote(path):
            return dict(safetensors.numpy.load(path.read_bytes()))
        return dict(safetensors.numpy.load_file(path))  # memory-mapped, no second copy
    except (safetensors.SafetensorError, ValueError, OverflowError) as error:
        raise ValueError(f"{path} is truncated or corrupt: it is not a readable .safetensors file "
                         f"({error})") from None


def _read_torch_pickle(path: epath.Path) -> dict[str, np.ndarray]:
    try:
        import torch  # noqa: PLC0415 - optional, only for pickled PyTorch checkpoints
    except ImportError:
        raise ImportError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), "
            f"or convert it to .safetensors first") from None
    with path.open("rb") as handle:
        checkpoint = torch.load(handle, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    return {k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
            for k, v in checkpoint.items() if hasattr(v, "detach")}


def read_state_dict(path: paths.PathLike) -> dict[str, np.ndarray]:
    """An open_clip state dict from `.safetensors` (numpy) or `.bin`/`.pt`/`.pth` (needs torch)."""
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.name.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.name.endswith((".bin", ".pt", ".pth")):
        return _read_torch_pickle(path)
    raise ValueError(f"unrecognised weights file {path}: expected .safetensors, .bin, .pt or .pth")


def find_weights_in_dir(directory: paths.PathLike) -> str:
    directory = epath.Path(directory)
    for name in _WEIGHT_FILES:
        if (directory / name).is_file():
            return str(directory / name)
    found = sorted(f.name for f in directory.iterdir() if f.name.endswith(_WEIGHT_SUFFIXES))
    if not found:
        raise FileNotFoundError(f"no weights (*.safetensors, *.bin, *.pth) in {directory}")
    return str(directory / found[0])


def read_open_clip_config(directory: paths.PathLike) -> dict[str, Any]:
    path = epath.Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{CONFIG_NAME} not found in {directory} (needed for the architecture)")
    config = json.loads(path.read_text(encoding="utf-8"))
    if "model_cfg" not in config:
        raise ValueError(f"{path} has no 'model_cfg' entry")
    return config


def write_open_clip_dir(directory: paths.PathLike, model_cfg: dict, preprocess_cfg: dict,
                        state_dict: dict[str, np.ndarray]) -> None:
    """An open_clip hf-hub folder: loads with `open_clip.create_model_and_transforms('local-dir:DIR')`.

    The weights are written before the config and each file appears whole, so an
    interrupted export never leaves a config next to half-written weights.
    """
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = safetensors.numpy.save({k: np.array(v, order="C") for k, v in state_dict.items()},
                                     metadata={"format": "pt"})
    paths.write_atomically(directory / WEIGHTS_NAME, weights)
    paths.write_atomically(directory / CONFIG_NAME,
                           json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))
