"""A user's labelled images -> TreeOfLife-layout training shards, a held-out eval set and tables.

Under the output directory:
    train/shard-000000.tar ...  webdataset shards: .jpg + the ten caption members of TreeOfLife-10M
    held_out/images/<class>/    images kept out of training (a share of each class, or whole classes)
    held_out/taxa.csv           their taxonomy, for zero-shot with any text type and per-rank scores
    taxa.csv, catalog.csv       every class; every image with its split, sample key and source path
    skipped.csv, info.json      what was left out and why; counts and parameters

Copies of one image (same bytes) are kept once, before the split, so none is both trained on
and held out. The output directory may not contain an input or sit inside the image folder.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import json
import os
import shutil

import numpy as np
from tqdm import tqdm

from bioclip_jax import paths
from bioclip_jax.data.decode import ImageDecodeError
from bioclip_jax.data.tar_writer import ShardWriter
from bioclip_jax.ingest import collection as collection_lib
from bioclip_jax.taxonomy import RANKS, sample_captions

TAXA_COLUMNS = ("class_name", *RANKS, "common")
_OUTPUTS = ("train", "held_out", "taxa.csv", "catalog.csv", "skipped.csv", "info.json")
_CHUNK = 256  # images in flight at once: bounded memory on collections of any size
_EXAMPLES = 3


def _check_apart(out: str, found: collection_lib.Collection) -> None:
    """Refuses an --output that contains an input (a table, an image) or sits inside the input folder:
    the outputs (taxa.csv, train/, ...) would replace the user's own files, --overwrite would delete them."""
    target = os.path.realpath(out)
    image_folders = {os.path.dirname(image.path): image.path for image in found.images}  # one check per folder
    for path, shown in [*((p, p) for p in found.inputs), *image_folders.items()]:
        if not path or paths.is_remote(path):
            continue
        real = os.path.realpath(path)
        if _within(real, target):
            raise ValueError(f"--output {out} contains the input {shown}: make-shards writes its outputs there "
                             f"({', '.join(_OUTPUTS)}), so choose an --output outside your data")
        if path in found.inputs and os.path.isdir(real) and _within(target, real):
            raise ValueError(f"--output {out} is inside the input folder {path}: the shards would mix with your "
                             f"images, so choose an --output outside it")


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _prepare(out: str, overwrite: bool) -> None:
    existing = [name for name in _OUTPUTS if os.path.lexists(os.path.join(out, name))]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({', '.join(existing)}); pass --overwrite to replace "
                              f"them or choose another --output")
    _remove_outputs(out)
    os.makedirs(out, exist_ok=True)


def _remove_outputs(out: str) -> None:
    for name in _OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _encoded(images, resize: int, threads: int):
    """(image, JPEG bytes or a Skip) in order, read by a thread pool a chunk at a time."""
    def read(image):
        try:
            return image, collection_lib.training_jpeg(image.path, resize)
        except FileNotFoundError:
            return image, collection_lib.Skip(image.path, "missing file")
        except (ImageDecodeError, OSError, ValueError) as error:
            return image, collection_lib.Skip(image.path, "unreadable image", str(error))

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(images), _CHUNK):
            yield from pool.map(read, images[start:start + _CHUNK])


def _write_table(path: str, columns, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _taxon_row(cls: collection_lib.CollectionClass) -> dict:
    return dict(zip(TAXA_COLUMNS, (cls.name, *cls.taxon.ranks_tuple(), cls.taxon.common)))


def make_shards(found: collection_lib.Collection, out: str, *, held_out_images: float = 0.1,
                held_out_classes: float = 0.0, seed: int = 0, samples_per_shard: int = 1000, resize: int = 0,
                threads: int = 4, overwrite: bool = False, progress: bool = True) -> dict:
    """Writes the layout of the module docstring; returns the counts (also saved in info.json).

    Copies of one image are dropped before the split (one of them kept), so that none is both
    trained on and held out. A run that fails part-way removes what it wrote, so it can be rerun as is.
    """
    _check_apart(out, found)
    found = collection_lib.drop_duplicates(found, threads)
    if not found.images:
        raise ValueError(f"no usable labelled image found ({len(found.skipped)} skipped: "
                         f"{_reasons(found.skipped)})")
    train, held = collection_lib.held_out_split(found, held_out_images, held_out_classes, seed)
    train = [train[i] for i in np.random.default_rng([seed, 1]).permutation(len(train))]  # classes mixed per shard
    _prepare(out, overwrite)
    try:
        catalog, skipped, shards = _write_images(found, train, held, out, samples_per_shard, resize, threads,
                                                 progress)
        if not any(row["split"] == "train" for row in catalog):
            raise ValueError(f"none of the {len(train)} training images could be read ({_reasons(skipped)}); "
                             f"nothing was written to {out}")
    except BaseException:
        _remove_outputs(out)
        raise
    written = collections.Counter(row["split"] for row in catalog)
    used = sorted({row["class_name"] for row in catalog})
    by_name = {c.name: c for c in found.classes}
    held_classes = sorted({row["class_name"] for row in catalog if row["split"] == "held_out"})
    _write_table(os.path.join(out, "taxa.csv"), TAXA_COLUMNS, [_taxon_row(by_name[n]) for n in used])
    if held_classes:
        _write_table(os.path.join(out, "held_out", "taxa.csv"), TAXA_COLUMNS,
                     [_taxon_row(by_name[n]) for n in held_classes])
    _write_table(os.path.join(out, "catalog.csv"), ("split", "key", "path", *TAXA_COLUMNS), catalog)
    _write_table(os.path.join(out, "skipped.csv"), ("where", "reason", "detail"),
                 [vars(s) for s in skipped])
    counts = {"classes": len(used), "train_images": written["train"], "train_shards": len(shards),
              "held_out_images": written["held_out"], "held_out_classes": len(held_classes),
              "skipped": len(skipped),
              "skipped_by_reason": dict(collections.Counter(s.reason for s in skipped))}
    info = {"parameters": dict(held_out_images=held_out_images, held_out_classes=held_out_classes, seed=seed,
                               samples_per_shard=samples_per_shard, resize=resize), "counts": counts}
    with open(os.path.join(out, "info.json"), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return {**counts, "skipped_examples": _examples(skipped)}


def _write_images(found: collection_lib.Collection, train: list, held: list, out: str, samples_per_shard: int,
                  resize: int, threads: int, progress: bool) -> tuple[list[dict], list, list]:
    """Training images into shards, held-out ones into class folders: (catalog rows, skips, shard paths)."""
    skipped = list(found.skipped)
    catalog, written = [], collections.Counter()
    captions = {}
    held_dir = os.path.join(out, "held_out", "images")
    with ShardWriter(os.path.join(out, "train"), samples_per_shard) as writer, \
            tqdm(total=len(train) + len(held), desc="make-shards", unit="img", disable=not progress) as bar:
        for split, images in (("train", train), ("held_out", held)):
            for image, data in _encoded(images, resize, threads):
                bar.update()
                if isinstance(data, collection_lib.Skip):
                    skipped.append(data)
                    continue
                cls = found.classes[image.class_index]
                key = f"{split}{written[split]:08d}"
                if split == "train":
                    if image.class_index not in captions:
                        captions[image.class_index] = {ext: text.encode("utf-8")
                                                       for ext, text in sample_captions(cls.taxon).items()}
                    writer.write(key, {"jpg": data, **captions[image.class_index]})
                else:
                    os.makedirs(os.path.join(held_dir, cls.name), exist_ok=True)
                    with open(os.path.join(held_dir, cls.name, f"{key}.jpg"), "wb") as handle:
                        handle.write(data)
                written[split] += 1
                catalog.append({"split": split, "key": key, "path": image.path, **_taxon_row(cls)})
        shards = writer.close()
    return catalog, skipped, shards


def _reasons(skipped: list[collection_lib.Skip]) -> str:
    """"missing file: 9, e.g. a.jpg; b.jpg | ...": what was left out, for a message."""
    counts = collections.Counter(s.reason for s in skipped)
    return " | ".join(f"{reason}: {counts[reason]}, e.g. {'; '.join(shown)}"
                      for reason, shown in _examples(skipped).items()) or "none"


def _examples(skipped: list[collection_lib.Skip]) -> dict[str, list[str]]:
    examples: dict[str, list[str]] = {}
    for skip in skipped:
        shown = examples.setdefault(skip.reason, [])
        if len(shown) < _EXAMPLES:
            shown.append(f"{skip.where}" + (f" ({skip.detail})" if skip.detail else ""))
    return examples


def summary(counts: dict, out: str) -> str:
    """What `make_shards` wrote and left out, for people."""
    lines = [f"wrote {out}",
             f"  train/: {counts['train_images']} images of {counts['classes']} classes in "
             f"{counts['train_shards']} shards"]
    if counts["held_out_images"]:
        lines.append(f"  held_out/images/: {counts['held_out_images']} images of {counts['held_out_classes']} "
                     f"classes; held_out/taxa.csv")
    else:
        lines.append("  no held-out images (--held-out-images 0 and --held-out-classes 0)")
    lines.append(f"  skipped: {counts['skipped']} (listed in skipped.csv)")
    for reason, examples in counts["skipped_examples"].items():
        lines.append(f"    {reason}: {counts['skipped_by_reason'][reason]}, e.g. {'; '.join(examples)}")
    return "\n".join(lines)


def finetune_command(out: str, held_out: bool) -> str:
    """The train command line for these shards (configs/finetune.py starts from BioCLIP 2 by default)."""
    out = os.path.abspath(out)
    parts = ["bioclip-jax train --config=configs/finetune.py --workdir=runs/finetune",
             f"--config.data.train_shards={out}/train"]
    if held_out:
        parts += [f"--config.eval.held_out_dir={out}/held_out/images",
                  f"--config.eval.taxa_file={out}/held_out/taxa.csv"]
    return " \\\n    ".join(parts)
