"""Image preprocessing identical to open_clip's evaluation transform.

Resize the shortest side to `size` (PIL, bicubic by default), centre crop, convert
to RGB, scale to [0, 1], normalise by the CLIP mean/std; the output is a float32
[size, size, 3] array (channels last, as the JAX towers expect). The order of
operations matches open_clip's so the numbers are the same to the last bit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from bioclip_jax.models.config import OPENAI_MEAN, OPENAI_STD

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
# PIL's bilinear resize is the antialiased filter torchvision ported; only the uint8 rounding differs.
PYBIOCLIP_TREE_OF_LIFE = PreprocessConfig(size=224, interpolation="bilinear", resize_mode="squash")

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
    """An image file as RGB (see to_rgb)."""
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


def normalize(pixels_uint8, mean: Sequence[float], std: Sequence[float]):
    """uint8 [..., 3] -> float32, (x / 255 - mean) / std. Works on numpy or jax arrays."""
    xp = jnp if not isinstance(pixels_uint8, np.ndarray) else np
    x = pixels_uint8.astype(xp.float32) / xp.float32(255.0)
    return (x - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


class ImageTransform:
    """PIL.Image -> float32 [size, size, 3], as open_clip's eval transform does."""

    def __init__(self, cfg: PreprocessConfig = PreprocessConfig()):
        self.cfg = cfg

    def crop(self, image: Image.Image) -> Image.Image:
        """Geometry only (resize + crop + RGB), for callers that normalise on the device."""
        cfg = self.cfg
        if cfg.resize_mode == "squash":
            image = image.resize((cfg.size, cfg.size), _PIL_INTERPOLATION[cfg.interpolation])
        else:
            image = center_crop(resize_shortest_side(image, cfg.size, cfg.interpolation), cfg.size)
        return image if image.mode == "RGB" else image.convert("RGB")

    def __call__(self, image: Image.Image) -> np.ndarray:
        return normalize(np.asarray(self.crop(image)), self.cfg.mean, self.cfg.std)

    def __repr__(self) -> str:
        return f"ImageTransform({self.cfg})"
