"""A user's own labelled images, read for fine-tuning: which file shows which taxon.

Two layouts, the ones open_clip / pybioclip users already keep their photos in:

    folder:  ROOT/<class>/**/*.jpg (sub-folders belong to their top-level class folder), plus a
             taxa.csv (kingdom, phylum, class, order, family, genus, species, common; optional
             class_name) naming each class folder, matched as the
             eval folders are (by class_name, scientific or taxonomic name; see eval_sources)
    table:   a CSV with an image path column (filepath, path, image, ...) and the columns
             kingdom .. species, common on every row; relative paths are read from the CSV's folder

What cannot be used is not an error but a `Skip` with its place and reason (a class folder
without a taxa row, a row without taxonomy, a file that is not an image), so one bad row in
a collection of thousands does not stop the job, and the report says exactly what was left out.
A CSV row with more or fewer fields than its header is refused by line (its ranks would shift).
`drop_duplicates` keeps one copy of each image content, and `held_out_split` then sets aside images
(or whole classes) for the run's own held-out eval.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import os

import numpy as np
from PIL import Image, ImageOps

from bioclip_jax.data import decode
from bioclip_jax.data.eval_sources import FolderData, checked_rows, read_taxa_lookup
# The eval folders' rules (where a taxa.csv is found, how class names match it), so both agree.
from bioclip_jax.data.eval_sources import default_taxa_file
from bioclip_jax.data.eval_sources import name_key as taxa_key
from bioclip_jax.paths import as_path, open_text
from bioclip_jax.taxonomy import Taxon

PATH_COLUMNS = ("filepath", "file_path", "path", "image", "image_path", "img", "filename", "file")
JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_QUALITY = 95
_EXIF_ORIENTATION = 0x0112
_CHECK_SIZE = 32  # a small draft-mode decode still reads every JPEG scan: truncation shows


@dataclasses.dataclass(frozen=True)
class CollectionClass:
    name: str    # folder name, or the scientific name for a table
    taxon: Taxon


@dataclasses.dataclass(frozen=True)
class LabelledImage:
    path: str
    class_index: int


@dataclasses.dataclass(frozen=True)
class Skip:
    where: str   # a path, a class folder, or CSV:LINE
    reason: str  # short and fixed ("no taxonomy", "unreadable image", ...), for counting
    detail: str = ""


@dataclasses.dataclass
class Collection:
    classes: list[CollectionClass]
    images: list[LabelledImage]
    skipped: list[Skip]
    inputs: list[str] = dataclasses.field(default_factory=list)  # the folder and tables it was read from


def read_folder_collection(root: str, taxa_file: str | None = None) -> Collection:
    """ROOT/<class>/<image> with the classes named in `taxa_file` (default: ROOT/taxa.csv or beside ROOT)."""
    taxa_file = taxa_file or default_taxa_file(root)
    if not taxa_file:
        raise FileNotFoundError(f"no taxa.csv in or next to {root}: give the taxonomy of each class folder with "
                                f"--taxa FILE (columns kingdom,phylum,class,order,family,genus,species,common and "
                                f"class_name = the folder name)")
    folder = FolderData(root)
    lookup = read_taxa_lookup(taxa_file)
    classes, index_of = [], {}
    for label, found in enumerate(folder.classes):
        taxon = lookup.get(taxa_key(found.name))
        if taxon is not None:
            index_of[label] = len(classes)
            classes.append(CollectionClass(found.name, taxon))
    images, skipped = [], []
    for item in folder.items():
        if item.label in index_of:
            images.append(LabelledImage(item.key, index_of[item.label]))
        else:
            skipped.append(Skip(item.key, "class not in taxa.csv",
                                f"folder {folder.classes[item.label].name!r} is no class_name, scientific or "
                                f"taxonomic name in {taxa_file}"))
    return Collection(classes, images, skipped, [root, taxa_file])


def _path_column(fieldnames: list[str], csv_path: str) -> str:
    lowered = {name.strip().lower(): name for name in fieldnames}
    for candidate in PATH_COLUMNS:
        if candidate in lowered:
            return lowered[candidate]
    raise ValueError(f"{csv_path} has no image path column: name one of {', '.join(PATH_COLUMNS)} "
                     f"(its columns are {', '.join(fieldnames)})")


def read_table_collection(csv_path: str, image_root: str | None = None) -> Collection:
    """One row per image: a path column plus kingdom .. species, common (see the module docstring)."""
    if not as_path(csv_path).is_file():
        raise FileNotFoundError(f"image table not found: {csv_path}")
    image_root = image_root or os.path.dirname(os.path.abspath(csv_path))
    classes: list[CollectionClass] = []
    index_of: dict[tuple, int] = {}
    images, skipped = [], []
    with open_text(csv_path) as handle:
        reader = csv.DictReader(handle)
        path_column = _path_column(list(reader.fieldnames or []), csv_path)
        if not {c.strip().lower() for c in reader.fieldnames} & {"kingdom", "genus", "species"}:
            raise ValueError(f"{csv_path} has no taxonomy columns (expected kingdom .. species, common)")
        for line, row in checked_rows(reader, csv_path):
            where = f"{csv_path}:{line}"
            path = (row.get(path_column) or "").strip()
            if not path:
                skipped.append(Skip(where, "no image path"))
                continue
            try:
                taxon = Taxon.from_mapping(row)
            except (TypeError, ValueError) as error:
                skipped.append(Skip(where, "bad taxonomy", str(error)))
                continue
            if taxon.is_empty:
                skipped.append(Skip(where, "no taxonomy", f"no rank given for {path}"))
                continue
            key = taxon.ranks_tuple()
            if key not in index_of:
                index_of[key] = len(classes)
                classes.append(CollectionClass(taxon.scientific_name, taxon))
            elif taxon.common and not classes[index_of[key]].taxon.common:
                classes[index_of[key]] = CollectionClass(classes[index_of[key]].name, taxon)  # first common name
            full = path if os.path.isabs(path) or "://" in path else os.path.join(image_root, path)
            images.append(LabelledImage(full, index_of[key]))
    return Collection(_unique_names(classes), images, skipped, [csv_path])


def _unique_names(classes: list[CollectionClass]) -> list[CollectionClass]:
    """Class names double as held-out folder names: homonyms (same Genus species, other ranks) get the
    full taxonomic name, and path separators are replaced."""
    counts: dict[str, int] = {}
    for c in classes:
        counts[c.name] = counts.get(c.name, 0) + 1
    named = []
    for c in classes:
        name = c.taxon.taxonomic_name if counts[c.name] > 1 else c.name
        named.append(CollectionClass(name.replace("/", "_").replace(os.sep, "_"), c.taxon))
    return named


def drop_duplicates(collection: Collection, threads: int = 4) -> Collection:
    """The collection with each image content once (files compared by SHA-256 of their bytes).

    Two copies of one photo would otherwise fall on both sides of the held-out split and score
    the model on an image it trained on. The first copy in order is kept; each other one becomes
    a Skip naming it. Files that cannot be read are kept, for the encoding step to report.
    """
    def digest(image: LabelledImage) -> bytes | None:
        try:
            return hashlib.sha256(as_path(image.path).read_bytes()).digest()
        except OSError:
            return None

    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        digests = list(pool.map(digest, collection.images))
    first: dict[bytes, LabelledImage] = {}
    kept, skipped = [], list(collection.skipped)
    for image, key in zip(collection.images, digests):
        original = first.get(key) if key is not None else None
        if original is not None:
            skipped.append(Skip(image.path, "duplicate image", f"same bytes as {original.path} "
                                f"(class {collection.classes[original.class_index].name})"))
            continue
        if key is not None:
            first[key] = image
        kept.append(image)
    return dataclasses.replace(collection, images=kept, skipped=skipped)


def held_out_split(collection: Collection, images: float = 0.0, classes: float = 0.0,
                   seed: int = 0) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """(train, held out): `classes` whole classes (a fraction < 1 or a count) and then `images` of
    each remaining class's images (a fraction; at least one when asked, never a class's last one).

    Held-out classes test zero-shot naming of taxa never trained on; held-out images of trained
    classes test how well the fine-tuned model names the user's own taxa. Same seed, same split.
    """
    if not 0.0 <= images < 1.0:
        raise ValueError(f"the held-out fraction of images must be in [0, 1), got {images}")
    if classes < 0 or (classes >= 1 and classes != int(classes)):
        raise ValueError(f"held-out classes must be a fraction in [0, 1) or a whole count, got {classes}")
    rng = np.random.default_rng(seed)
    count = len(collection.classes)
    n_classes = int(classes) if classes >= 1 else int(round(classes * count))
    if n_classes >= count:
        raise ValueError(f"holding out {n_classes} of {count} classes leaves none to train on")
    held_classes = set(rng.permutation(count)[:n_classes].tolist())
    by_class: dict[int, list[LabelledImage]] = {}
    for image in collection.images:
        by_class.setdefault(image.class_index, []).append(image)
    train, held = [], []
    for index in range(count):
        members = by_class.get(index, [])
        if index in held_classes:
            held += members
            continue
        take = 0
        if images > 0 and len(members) > 1:
            take = min(len(members) - 1, max(1, int(round(images * len(members)))))
        chosen = set(rng.permutation(len(members))[:take].tolist())
        for position, image in enumerate(members):
            (held if position in chosen else train).append(image)
    return train, held


def training_jpeg(path: str, resize: int = 0) -> bytes:
    """The image as JPEG bytes for a shard; raises decode.ImageDecodeError (or OSError) when unusable.

    JPEGs that need no change are copied byte for byte. Other formats, photos with an EXIF
    rotation (training decodes ignore EXIF) and, with `resize`, images whose shorter side is
    longer than `resize` pixels are re-encoded (quality 95, bicubic downscale).
    """
    data = as_path(path).read_bytes()
    try:
        decode.decode_and_crop(data, _CHECK_SIZE, np.random.default_rng(0))  # reads every scan
    except decode.ImageDecodeError:
        raise decode.ImageDecodeError("not an image, or a corrupt or truncated one") from None
    with Image.open(io.BytesIO(data)) as image:
        rotated = image.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
        too_big = resize > 0 and min(image.size) > resize
        if data.startswith(JPEG_MAGIC) and not rotated and not too_big and image.mode in ("RGB", "L"):
            return data
        image = ImageOps.exif_transpose(image).convert("RGB")
        if too_big:
            scale = resize / min(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                 Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()
