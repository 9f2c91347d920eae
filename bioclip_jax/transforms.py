"""Image preprocessing identical to open_clip's evaluation transform.

Resize the shortest side to `size` (PIL, bicubic by default), centre crop, convert
to RGB, scale to [0, 1], normalise by the CLIP mean/std; the output is a float32
[size, size, 3] array (channels last, as the JAX towers expect). The order of
operations matches open_clip's so the numbers are the same to the last bit.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from bioclip_jax.models.config import OPENAI_MEAN, OPENAI_STD
from bioclip_jax.paths import as_path, is_remote

_PIL_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """open_clip's `preprocess_cfg` (the subset that affects evaluation)."""

    size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    # Resize the [0, 1] float image (torchvision's tensor Resize after ToTensor, as pybioclip does)
    # instead of the 8-bit PIL image (open_clip's order); not part of open_clip's preprocess_cfg.
    resize_in_float: bool = False

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any], size: int) -> "PreprocessConfig":
        size_value = cfg.get("size", size)
        if isinstance(size_value, (list, tuple)):
            size_value = size_value[0]
        out = cls(size=int(size_value), mean=tuple(cfg.get("mean", OPENAI_MEAN)),
                  std=tuple(cfg.get("std", OPENAI_STD)),
                  interpolation=cfg.get("interpolation", "bicubic"),
                  resize_mode=cfg.get("resize_mode", "shortest"))
        if out.interpolation not in _PIL_INTERPOLATION:
            raise ValueError(f"unsupported interpolation {out.interpolation!r}; "
                             f"supported: {sorted(_PIL_INTERPOLATION)}")
        if out.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported resize_mode {out.resize_mode!r}; supported: shortest, squash")
        return out

    def to_open_clip(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "resize_mode": self.resize_mode}


# pybioclip's preprocessing for its two tree-of-life models (hf-hub:imageomics/bioclip and -2):
# ToTensor, Resize((224, 224), antialias=True), CLIP Normalize: the whole image squashed, no crop.
# PIL's bilinear resize is the antialiased filter torchvision ported, so resizing each channel as a
# 32-bit float PIL image gives torchvision's tensor resize.
# Resizing the float image, as pybioclip does, avoids an 8-bit rounding that costs ~3e-4 in scores.
PYBIOCLIP_TREE_OF_LIFE = PreprocessConfig(size=224, interpolation="bilinear", resize_mode="squash",
                                          resize_in_float=True)

_WIDE_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for any PIL mode; 16- and 32-bit images are scaled to 8 bits, not clipped to white.

    PIL's own convert("RGB") of a 16-bit PNG (mode I or I;16) clips every value above 255.
    """
    if image.mode not in _WIDE_MODES:
        return image if image.mode == "RGB" else image.convert("RGB")
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        top = 1.0 if pixels.max(initial=0.0) <= 1.0 else pixels.max()
    else:
        top = 255.0 if pixels.max(initial=0) <= 255 else 65535.0
    scaled = np.clip(np.round(pixels * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, "L").convert("RGB")


def open_rgb(path) -> Image.Image:
    """An image as RGB (see to_rgb): a local file, a gs:// object (fetched in one request) or a binary stream."""
    if isinstance(path, (str, os.PathLike)) and is_remote(path):
        path = io.BytesIO(as_path(path).read_bytes())  # PIL's many small reads would each be a request
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def resize_shortest_side(image: Image.Image, size: int, interpolation: str = "bicubic") -> Image.Image:
    """torchvision's Resize(int): the short side becomes `size`, the long one is truncated."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, _PIL_INTERPOLATION[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's CenterCrop for an image at least `size` on each side."""
    width, height = image.size
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(pixels, mean: Sequence[float], std: Sequence[float]):
    """uint8 (or float on the 0..255 scale) [..., 3] -> float32, (x / 255 - mean) / std; numpy or jax."""
    xp = jnp if not isinstance(pixels, np.ndarray) else np
    x = pixels.astype(xp.float32) / xp.float32(255.0)
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def _resize_channels_in_float(image: Image.Image, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """float32 [h, w, 3] on the 0..255 scale: each RGB channel resized as a 32-bit float image."""
    channels = [channel.convert("F").resize(size, _PIL_INTERPOLATION[interpolation]) for channel in image.split()]
    return np.stack([np.asarray(channel, np.float32) for channel in channels], axis=-1)


class ImageTransform:
    """PIL.Image -> float32 [size, size, 3], as open_clip's eval transform does."""

    def __init__(self, cfg: PreprocessConfig = PreprocessConfig()):
        self.cfg = cfg

    @property
    def pixel_dtype(self) -> type:
        """What `pixels` returns: uint8, or float32 (0..255 scale) when resizing in float."""
        return np.float32 if self.cfg.resize_in_float else np.uint8

    def crop(self, image: Image.Image) -> Image.Image:
        """Geometry (resize + crop), then RGB, in open_clip's order; the result is 8-bit RGB."""
        cfg = self.cfg
        if cfg.resize_mode == "squash":
            image = image.resize((cfg.size, cfg.size), _PIL_INTERPOLATION[cfg.interpolation])
        else:
            image = center_crop(resize_shortest_side(image, cfg.size, cfg.interpolation), cfg.size)
        return to_rgb(image)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """[size, size, 3] of `pixel_dtype`, not yet normalised (callers normalise on the device)."""
        cfg = self.cfg
        if not cfg.resize_in_float:
            return np.asarray(self.crop(image), np.uint8)
        if cfg.resize_mode != "squash":
            raise ValueError("resize_in_float is implemented for resize_mode='squash' only")
        return _resize_channels_in_float(to_rgb(image), (cfg.size, cfg.size), cfg.interpolation)

    def __call__(self, image: Image.Image) -> np.ndarray:
        return normalize(self.pixels(image), self.cfg.mean, self.cfg.std)

    def __repr__(self) -> str:
        return f"ImageTransform({self.cfg})"
