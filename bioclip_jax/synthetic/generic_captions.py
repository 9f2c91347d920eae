"""A small general-domain image-caption set: the test stand-in for BioCLIP 2's LAION replay data.

Each sample is a webdataset pair `.jpg` + `.txt` ("a photo of two red squares on a grey
background"), in the layout of an img2dataset LAION download, so `data.replay_shards`
reads it exactly as it would read LAION. Everything is a function of the seed.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from bioclip_jax.data.tar_writer import ShardWriter
from bioclip_jax.synthetic.images import encode_jpeg

COLOURS = {"red": (200, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 40),
           "black": (20, 20, 20), "white": (240, 240, 240)}
BACKGROUNDS = {"grey": (128, 128, 128), "sand": (194, 178, 128), "sky": (135, 190, 235)}
SHAPES = ("square", "circle")
COUNTS = ("one", "two", "three")


def _draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    colour, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
    shape, count = rng.choice(SHAPES), int(rng.integers(1, len(COUNTS) + 1))
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = BACKGROUNDS[background]
    rows, cols = np.mgrid[:size, :size]
    radius = size // 8
    for _ in range(count):
        cy, cx = rng.integers(radius, size - radius, size=2)
        if shape == "square":
            inside = (abs(rows - cy) <= radius) & (abs(cols - cx) <= radius)
        else:
            inside = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius ** 2
        pixels[inside] = COLOURS[colour]
    plural = "s" if count > 1 else ""
    return pixels, f"a photo of {COUNTS[count - 1]} {colour} {shape}{plural} on a {background} background"


def write_generic_captions(out_dir: str, count: int, *, seed: int = 0, image_size: int = 64,
                           samples_per_shard: int = 1000, overwrite: bool = False) -> list[str]:
    """Writes `count` image-caption pairs as shards in `out_dir`; returns the shard paths."""
    if count < 1:
        raise ValueError(f"the generic caption set needs at least one sample, got {count}")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        if not overwrite:
            raise FileExistsError(f"{out_dir} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    rng = np.random.default_rng([seed, 0x6E6E])
    os.makedirs(out_dir, exist_ok=True)
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for index in range(count):
            pixels, caption = _draw(rng, image_size)
            writer.write(f"generic{index:08d}", {"jpg": encode_jpeg(pixels), "txt": caption.encode()})
    return writer.shard_paths
