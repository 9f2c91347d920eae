"""Shared fixtures for tests that compare against open_clip (torch is a test-only dependency)."""

from __future__ import annotations

import numpy as np
import open_clip
import torch
from safetensors.torch import save_file


def random_open_clip(name: str, seed: int = 0):
    """A randomly initialised open_clip model whose LayerNorms and biases are not trivial."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name).eval()
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if param.ndim <= 1 or ".ln" in pname or pname.startswith("ln"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_safetensors(model, path: str) -> dict:
    state_dict = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state_dict, path)
    return state_dict


def random_inputs(image_size: int, batch: int = 2, seed: int = 0):
    """Images [B,H,W,3] float32 and token rows with start, end and padding like real captions."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    tokens = np.zeros((batch, 77), np.int64)
    for row in range(batch):
        length = int(rng.integers(3, 77))
        tokens[row, 0] = 49406
        tokens[row, 1:length - 1] = rng.integers(1, 49406, length - 2)
        tokens[row, length - 1] = 49407
    return images, tokens


def torch_features(model, images: np.ndarray, tokens: np.ndarray):
    with torch.no_grad():
        image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        text = model.encode_text(torch.from_numpy(tokens)).numpy()
    return image, text


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())
