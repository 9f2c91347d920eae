"""Writes the synthetic tree of life: the project's built-in stand-in for TreeOfLife-10M.

The output has the real dataset's layout, so every command that reads TreeOfLife-10M
reads it unchanged:

    out_dir/train/shard-000000.tar ...   webdataset shards, one .jpg + 10 text members per sample
    out_dir/val/shard-000000.tar ...     more images of the training species
    out_dir/held_out/images/<Genus species>/0000.jpg   species never in train or val
    out_dir/held_out/taxa.csv            their taxonomy (kingdom .. species, common)
    out_dir/taxa.csv                     every species, training and held out
    out_dir/catalog.csv                  the TreeOfLife-10M catalog columns, one row per image
    out_dir/info.json, README.md         parameters, seed and counts

Everything is a function of the seed: the same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import os
import shutil
import uuid
from typing import Iterator

import numpy as np
from tqdm import tqdm

from bioclip_jax.data.tar_writer import ShardWriter
from bioclip_jax.synthetic.images import encode_jpeg, render
from bioclip_jax.synthetic.names import EPITHET_TRAITS
from bioclip_jax.synthetic.tree import SyntheticSpecies, build_species
from bioclip_jax.taxonomy import Taxon, sample_captions

CATALOG_COLUMNS = (
    "split", "treeoflife_id", "eol_content_id", "eol_page_id", "bioscan_part", "bioscan_filename",
    "inat21_filename", "inat21_cls_name", "inat21_cls_num",
    "kingdom", "phylum", "class", "order", "family", "genus", "species", "common",
)
TAXA_COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus", "species", "common")
JPEG_QUALITY = 90
_OUTPUTS = ("train", "val", "held_out", "catalog.csv", "taxa.csv", "info.json", "README.md")


@dataclasses.dataclass(frozen=True)
class SyntheticSummary:
    """What `make_synthetic` wrote: counts and paths, also saved as info.json."""

    out_dir: str
    parameters: dict
    counts: dict
    train_shards: list[str]
    val_shards: list[str]


@dataclasses.dataclass(frozen=True)
class _Image:
    species: SyntheticSpecies
    number: int  # within its species
    treeoflife_id: str
    split: str


def make_synthetic(
    out_dir: str,
    species: int = 200,
    images_per_species: int = 40,
    held_out_species: float | int = 0.1,
    seed: int = 0,
    image_size: int = 64,
    val_fraction: float = 0.1,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    progress: bool = False,
    workers: int = 1,
) -> SyntheticSummary:
    """Generates the dataset under `out_dir` (see the module docstring for the layout).

    `held_out_species` is a fraction of all species (< 1) or a count (>= 1). Each
    training species gives `images_per_species` images, `val_fraction` of them to val;
    each held-out species gives as many to the held-out image folder. `workers` > 1
    renders in that many processes; the bytes do not depend on it.
    """
    _check_parameters(images_per_species, image_size, val_fraction, samples_per_shard, workers)
    parameters = dict(species=species, images_per_species=images_per_species,
                      held_out_species=held_out_species, seed=seed, image_size=image_size,
                      val_fraction=val_fraction, samples_per_shard=samples_per_shard,
                      jpeg_quality=JPEG_QUALITY)
    tree = build_species(species, held_out_species, seed)
    _prepare(out_dir, overwrite)
    images = _plan_images(tree, images_per_species, val_fraction, seed)
    with tqdm(total=len(images), desc="synthetic images", unit="img", disable=not progress) as bar:
        shards = _write_images(out_dir, images, _encoded(images, seed, image_size, workers),
                               samples_per_shard, bar)
    _write_table(os.path.join(out_dir, "taxa.csv"), TAXA_COLUMNS, [_taxon_row(s.taxon) for s in tree])
    _write_table(os.path.join(out_dir, "held_out", "taxa.csv"), TAXA_COLUMNS,
                 [_taxon_row(s.taxon) for s in tree if s.held_out])
    _write_table(os.path.join(out_dir, "catalog.csv"), CATALOG_COLUMNS, [_catalog_row(i) for i in images])
    summary = SyntheticSummary(out_dir, parameters, _counts(tree, images, shards), shards["train"], shards["val"])
    _write_info(out_dir, summary)
    return summary


def _check_parameters(images_per_species, image_size, val_fraction, samples_per_shard, workers) -> None:
    whole = dict(images_per_species=images_per_species, image_size=image_size,
                 samples_per_shard=samples_per_shard, workers=workers)
    for name, value in whole.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if images_per_species < 1:
        raise ValueError(f"images_per_species must be at least 1, got {images_per_species}")
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be between 16 and 1024 pixels, got {image_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")


def _prepare(out_dir: str, overwrite: bool) -> None:
    """Refuses to mix with an earlier dataset unless asked to replace it (only our own outputs go)."""
    existing = [name for name in _OUTPUTS if os.path.lexists(os.path.join(out_dir, name))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a dataset ({', '.join(existing)}); pass overwrite=True "
            f"(--overwrite) to replace it or choose another directory"
        )
    for name in existing:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    os.makedirs(out_dir, exist_ok=True)


def _plan_images(tree: list[SyntheticSpecies], per_species: int, val_fraction: float, seed: int) -> list[_Image]:
    """Every image with its id and split, in write order (each split shuffled, as real shards are)."""
    id_rng = np.random.default_rng([seed, 1])
    n_val = int(round(val_fraction * per_species))
    by_split: dict[str, list[_Image]] = {"train": [], "val": [], "held_out": []}
    for s in tree:
        for number in range(per_species):
            if s.held_out:
                split = "held_out"
            else:
                split = "val" if number >= per_species - n_val else "train"
            key = str(uuid.UUID(bytes=id_rng.bytes(16), version=4))
            by_split[split].append(_Image(s, number, key, split))
    order_rng = np.random.default_rng([seed, 2])
    for split in ("train", "val"):
        by_split[split] = [by_split[split][i] for i in order_rng.permutation(len(by_split[split]))]
    return by_split["train"] + by_split["val"] + by_split["held_out"]


def _render_jpeg(task: tuple) -> bytes:
    """One image from (looks, seed, species index, number, size): never depends on write order."""
    looks, seed, species_index, number, size = task
    rng = np.random.default_rng([seed, 3, species_index, number])
    return encode_jpeg(render(looks, rng, size), JPEG_QUALITY)


def _encoded(images: list[_Image], seed: int, size: int, workers: int) -> Iterator[bytes]:
    """JPEG bytes of `images`, in order, rendered here or by a pool of spawned processes."""
    tasks = ((i.species.looks, seed, i.species.index, i.number, size) for i in images)
    if workers <= 1:
        yield from map(_render_jpeg, tasks)
        return
    # spawn, not fork: the caller may hold JAX or other threads that a fork would copy mid-flight
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_render_jpeg, tasks, chunksize=64)


def _write_images(out_dir, images, jpegs, samples_per_shard, bar) -> dict[str, list[str]]:
    """Train and val images into shards with all caption members; held-out ones into species folders."""
    captions: dict[int, dict[str, bytes]] = {}
    writers = {split: ShardWriter(os.path.join(out_dir, split), samples_per_shard) for split in ("train", "val")}
    held_out_dir = os.path.join(out_dir, "held_out", "images")
    os.makedirs(held_out_dir, exist_ok=True)
    for image, jpeg in zip(images, jpegs):
        s = image.species
        if image.split == "held_out":
            species_dir = os.path.join(held_out_dir, s.taxon.scientific_name)
            os.makedirs(species_dir, exist_ok=True)
            with open(os.path.join(species_dir, f"{image.number:04d}.jpg"), "wb") as handle:
                handle.write(jpeg)
        else:
            if s.index not in captions:
                captions[s.index] = {ext: text.encode("utf-8") for ext, text in sample_captions(s.taxon).items()}
            writers[image.split].write(image.treeoflife_id, {"jpg": jpeg, **captions[s.index]})
        bar.update()
    return {split: [os.path.relpath(path, out_dir) for path in writer.close()] for split, writer in writers.items()}


def _taxon_row(taxon: Taxon) -> dict[str, str]:
    return dict(zip(TAXA_COLUMNS, (*taxon.ranks_tuple(), taxon.common)))


def _catalog_row(image: _Image) -> dict[str, str]:
    return {"split": image.split, "treeoflife_id": image.treeoflife_id, **_taxon_row(image.species.taxon)}


def _write_table(path: str, columns, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _counts(tree: list[SyntheticSpecies], images: list[_Image], shards: dict[str, list[str]]) -> dict:
    plurals = dict(kingdom="kingdoms", phylum="phyla", **{"class": "classes"}, order="orders",
                   family="families", genus="genera")
    counts = {plural: len({s.taxon.lineage(rank) for s in tree}) for rank, plural in plurals.items()}
    counts.update(
        species=len(tree),
        train_species=sum(not s.held_out for s in tree),
        held_out_species=sum(s.held_out for s in tree),
        **{f"{split}_images": sum(i.split == split for i in images) for split in ("train", "val", "held_out")},
        train_shards=len(shards["train"]),
        val_shards=len(shards["val"]),
    )
    return counts


def _write_info(out_dir: str, summary: SyntheticSummary) -> None:
    info = {
        "dataset": "bioclip_jax synthetic tree of life",
        "parameters": summary.parameters,
        "counts": summary.counts,
        "epithet_traits": {entry.epithet: entry.trait for entry in EPITHET_TRAITS},
        "train_shards": summary.train_shards,
        "val_shards": summary.val_shards,
    }
    with open(os.path.join(out_dir, "info.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
        handle.write("\n")
    c, p = summary.counts, summary.parameters
    readme = f"""# Synthetic tree of life (bioclip_jax)

Generated by `bioclip-jax make-synthetic` with seed {p['seed']}: the same seed gives the same bytes.

- {c['species']} species ({c['held_out_species']} held out) in {c['genera']} genera,
  {c['families']} families, {c['orders']} orders, {c['classes']} classes,
  {c['phyla']} phyla, {c['kingdoms']} kingdoms.
- train/: {c['train_images']} images in {c['train_shards']} webdataset shards (TreeOfLife-10M layout:
  .jpg plus scientific_name, taxonomic_name, common_name, sci, com, taxon, taxonTag,
  sci_com, taxon_com, taxonTag_com .txt members).
- val/: {c['val_images']} more images of the training species in {c['val_shards']} shards.
- held_out/images/<Genus species>/: {c['held_out_images']} images of species never in train or val;
  held_out/taxa.csv lists their taxonomy. taxa.csv lists every species; catalog.csv every image.

Visual traits follow the tree: kingdom -> background and body plan, phylum/class -> body
shape, order/family -> body colour, genus -> surface pattern, species epithet -> a named
trait (rubra = red patch, striata = stripes, maculata = spots, ...). Common names are
"<trait adjective> <genus noun>". Held-out species share their genus with training
species and their epithet with training species of other genera, so zero-shot
classification of them is possible only through the names.
"""
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as handle:
        handle.write(readme)
