"""A user's own photo collection, drawn from the synthetic tree of life: class folders + taxa.csv."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
from PIL import Image

from bioclip_jax.synthetic.images import encode_jpeg, render
from bioclip_jax.synthetic.tree import build_species
from bioclip_jax.taxonomy import RANKS

TAXA_HEADER = ("class_name", *RANKS, "common")


def write_collection(root, species: int = 6, images: int = 4, seed: int = 0, size: int = 64, png_every: int = 0):
    """ROOT/<Genus species>/NNN.jpg (every `png_every`-th image a .png) and ROOT/taxa.csv; returns the species.

    One species per genus (while there are genera enough), so the classes differ in more than an epithet.
    """
    tree, genera = [], set()
    for s in build_species(species * 6, 0, seed):
        if s.taxon.genus not in genera and len(tree) < species:
            tree.append(s)
            genera.add(s.taxon.genus)
    rows = []
    for s in tree:
        folder = os.path.join(root, s.taxon.scientific_name)
        os.makedirs(folder, exist_ok=True)
        for n in range(images):
            pixels = render(s.looks, np.random.default_rng([seed, s.index, n]), size)
            if png_every and n % png_every == png_every - 1:
                Image.fromarray(pixels).save(os.path.join(folder, f"{n:03d}.png"))
            else:
                with open(os.path.join(folder, f"{n:03d}.jpg"), "wb") as handle:
                    handle.write(encode_jpeg(pixels))
        rows.append((s.taxon.scientific_name, *s.taxon.ranks_tuple(), s.taxon.common))
    write_taxa(os.path.join(root, "taxa.csv"), rows)
    return tree


def write_taxa(path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TAXA_HEADER)
        writer.writerows(rows)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
