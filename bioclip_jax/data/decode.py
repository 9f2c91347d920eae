"""Training-time image decode: JPEG bytes -> RandomResizedCrop -> uint8 [H, W, 3].

The crop follows torchvision's RandomResizedCrop (the BioCLIP recipe uses
scale=(0.9, 1.0), ratio=(3/4, 4/3)) with a bicubic resize. The crop is drawn in
the original image's coordinates and only then is the JPEG decoded, with PIL's
`draft` mode picking the smallest DCT downscale (1/2, 1/4, 1/8) that still leaves
the crop at least as large as the output; large images thus decode several times
faster and the result stays the same function of (bytes, rng state).
Normalisation happens later, on device.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

DEFAULT_SCALE = (0.9, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
_CROP_ATTEMPTS = 10


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (corrupt, truncated, or not an image)."""


def _output_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, (int, np.integer)) else size
    if height <= 0 or width <= 0:
        raise ValueError(f"output size must be positive, got {size}")
    return int(height), int(width)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = DEFAULT_SCALE,
                            ratio: tuple[float, float] = DEFAULT_RATIO) -> tuple[int, int, int, int]:
    """(left, top, crop width, crop height): a random area fraction in `scale` and aspect in `ratio`.

    Ten tries at a box that fits, then the centred box of the nearest allowed aspect,
    as torchvision does.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return left, top, crop_w, crop_h
    aspect = width / height
    if aspect < min(ratio):
        crop_w, crop_h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        crop_w, crop_h = int(round(height * max(ratio))), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


def decode_and_crop(data: bytes, size: int | tuple[int, int], rng: np.random.Generator, *,
                    scale: tuple[float, float] = DEFAULT_SCALE, ratio: tuple[float, float] = DEFAULT_RATIO,
                    flip: bool = False) -> np.ndarray:
    """A random resized crop of the encoded image as uint8 [height, width, 3].

    Raises ImageDecodeError for anything PIL cannot fully decode; the rng is only
    advanced by the crop (and flip) draws, never by the decoding.
    """
    out_h, out_w = _output_hw(size)
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except Exception as error:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise ImageDecodeError(f"cannot identify image: {error}") from None
    left, top, crop_w, crop_h = random_resized_crop_box(width, height, rng, scale, ratio)
    mirror = flip and rng.random() < 0.5
    try:
        image.draft("RGB", (math.ceil(out_w * width / crop_w), math.ceil(out_h * height / crop_h)))
        fx, fy = image.size[0] / width, image.size[1] / height
        box = (left * fx, top * fy, (left + crop_w) * fx, (top + crop_h) * fy)
        image = image.convert("RGB").resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)
    except Exception as error:  # noqa: BLE001 - truncated or damaged data fails here, in any of PIL's types
        raise ImageDecodeError(f"cannot decode image: {error}") from None
    if mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image, dtype=np.uint8)
