"""Labelled evaluation data behind one interface: class list + (image, class index) stream.

    folder:PATH               PATH/<class name>/*.jpg (one directory per class)
    tfds:NAME[:SPLIT]         a prepared TFDS dataset, read without TensorFlow (`tfds.data_source`)
    shards:PATTERN            webdataset tar shards (glob or {000..031} range) with a label member

Folders, shards and taxa files may be local or in `gs://` (read through etils.epath).

Classes can carry a taxonomy from a taxa.csv (columns kingdom, phylum, class, order, family,
genus, species, common; optional `class_name`), matched to class names by `class_name`, by
scientific name ("Corvus corax", also "Corvus_corax") or by the full taxonomic name. That
lets zero-shot use any text type and enables per-rank scoring. Folder and shard datasets pick up
a taxa.csv inside their directory or next to it when none is given.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import logging
import os
import re
import tarfile
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from bioclip_jax.data.image_items import IMAGE_EXTENSIONS, ImageItem, bytes_item, file_item
from bioclip_jax.data.shard_patterns import expand_shard_pattern
from bioclip_jax.paths import as_path, expand_user, is_remote, open_text
from bioclip_jax.taxonomy import Taxon

log = logging.getLogger(__name__)

TAXA_FILE = "taxa.csv"
DEFAULT_LABEL_KEY = "scientific_name.txt"
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SOURCE_KINDS = ("folder", "tfds", "shards")


@dataclasses.dataclass(frozen=True)
class EvalClass:
    name: str
    taxon: Taxon | None = None


class EvalData:
    """A labelled image set: `classes` in label order, `items()` yields ImageItems labelled by index."""

    name: str
    classes: list[EvalClass]

    def __len__(self) -> int:
        raise NotImplementedError

    def items(self) -> Iterator[ImageItem]:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def has_taxonomy(self) -> bool:
        return bool(self.classes) and all(c.taxon is not None for c in self.classes)


class FolderData(EvalData):
    def __init__(self, root: str, name: str | None = None):
        root = expand_user(root)
        if not as_path(root).is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        self.root = root
        self.name = name or os.path.basename(os.path.normpath(root))
        self._files: list[tuple[str, int]] = []
        self.classes = []
        for entry in sorted(_names(root)):
            directory = os.path.join(root, entry)
            if entry.startswith(".") or not as_path(directory).is_dir():
                continue
            images = _image_files(directory)
            if not images:
                log.warning(f"{self.name}: class directory {directory} has no images; ignored")
                continue
            self._files += [(path, len(self.classes)) for path in images]
            self.classes.append(EvalClass(entry))
        if not self.classes:
            raise ValueError(f"{root} has no class directories with images (expected {root}/<class>/*.jpg)")

    def __len__(self) -> int:
        return len(self._files)

    def items(self) -> Iterator[ImageItem]:
        return (_image_file_item(path, label) for path, label in self._files)


def _names(directory: str) -> list[str]:
    """Entries of a local or gs:// directory; locally os.listdir, which builds no Path object per entry."""
    if is_remote(directory):
        return [path.name for path in as_path(directory).iterdir()]
    return os.listdir(directory)


def _image_files(directory: str) -> list[str]:
    """Image paths anywhere under a class directory, sorted: sub-folders (by site, by date) belong
    to the class of the top-level folder. Hidden entries are left out; only names without an image
    extension are asked whether they are folders (one request each on gs://)."""
    found = []
    for name in _names(directory):
        path = os.path.join(directory, name)
        if name.startswith("."):
            continue
        if name.lower().endswith(IMAGE_EXTENSIONS):
            found.append(path)
        elif as_path(path).is_dir():
            found += _image_files(path)
    return sorted(found)


def _image_file_item(path: str, label: int) -> ImageItem:
    """PIL opens local files by name; a gs:// image is fetched whole when the loader opens it."""
    if not is_remote(path):
        return file_item(path, label)
    return ImageItem(path, functools.partial(_open_remote_image, path), label)


def _open_remote_image(path: str) -> Image.Image:
    return Image.open(io.BytesIO(as_path(path).read_bytes()))


class TfdsData(EvalData):
    """A prepared TFDS dataset; images and labels come from the supervised keys or the features."""

    def __init__(self, dataset: str, split: str | None = None, *, data_dir: str | None = None,
                 download: bool = False, name: str | None = None):
        import tensorflow_datasets as tfds  # noqa: PLC0415 - only this source needs it

        builder = tfds.builder(dataset, data_dir=data_dir)
        features = builder.info.features
        self.image_key, self.label_key = tfds_keys(dataset, builder.info)
        if split is None:
            split = next((s for s in ("test", "validation", "train") if s in builder.info.splits), None)
            if split is None:
                split = next(iter(builder.info.splits), "test")
        try:
            self.source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=download)
        except Exception as error:  # TFDS raises several types for "not there"
            raise FileNotFoundError(f"TFDS dataset {dataset}:{split} is not available in "
                                    f"{data_dir or '~/tensorflow_datasets'} (prepare it with `tfds build "
                                    f"{dataset}` or allow --tfds-download): {error}") from error
        self.name = name or f"{dataset}:{split}"
        self.classes = [EvalClass(n) for n in features[self.label_key].names]

    def __len__(self) -> int:
        return len(self.source)

    def _read(self, index: int) -> tuple[Image.Image, int]:
        """Runs in the loader's threads: one record read gives the decoded image and its label."""
        record = self.source[index]
        return Image.fromarray(np.asarray(record[self.image_key])), int(record[self.label_key])

    def items(self) -> Iterator[ImageItem]:
        return (ImageItem(f"{self.name}[{i}]", functools.partial(self._read, i)) for i in range(len(self.source)))


def tfds_keys(dataset: str, info) -> tuple[str, str]:
    import tensorflow_datasets as tfds  # noqa: PLC0415

    features = info.features
    keys = info.supervised_keys
    if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        image_key, label_key = keys
    else:
        image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
        label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    if image_key is None or label_key is None or not isinstance(features[label_key], tfds.features.ClassLabel):
        raise ValueError(f"TFDS dataset {dataset!r} has no (Image, ClassLabel) feature pair to evaluate on")
    return image_key, label_key


class ShardData(EvalData):
    """Webdataset shards read front to back; a first pass over the tar headers finds the labels."""

    def __init__(self, pattern: str, label_key: str = DEFAULT_LABEL_KEY, name: str | None = None):
        self.paths = expand_shard_pattern(pattern)
        self.label_key = label_key.lstrip(".")
        self.name = name or os.path.basename(os.path.dirname(self.paths[0])) or "shards"
        labels = [label for _, label in self._labels()]
        if not labels:
            raise ValueError(f"no sample in {pattern} has both an image and a {self.label_key!r} member")
        self.classes = [EvalClass(n) for n in sorted(set(labels), key=_natural_key)]
        self._index = {c.name: i for i, c in enumerate(self.classes)}
        self._count = len(labels)

    def __len__(self) -> int:
        return self._count

    def _samples(self, with_images: bool) -> Iterator[tuple[str, dict[str, bytes]]]:
        wanted = {self.label_key, *SHARD_IMAGE_KEYS} if with_images else {self.label_key}
        for path in self.paths:
            yield from _tar_samples(path, wanted, SHARD_IMAGE_KEYS)

    def _labels(self) -> Iterator[tuple[str, str]]:
        for key, members in self._samples(with_images=False):
            if self.label_key in members and members.get("__has_image__"):
                yield key, members[self.label_key].decode("utf-8", "replace").strip()

    def items(self) -> Iterator[ImageItem]:
        for key, members in self._samples(with_images=True):
            image = next((members[k] for k in SHARD_IMAGE_KEYS if k in members), None)
            if image is None or self.label_key not in members:
                continue
            label = members[self.label_key].decode("utf-8", "replace").strip()
            yield bytes_item(key, image, self._index[label])


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _tar_samples(path: str, wanted: set[str], image_keys: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) per sample, reading only `wanted` members; a damaged tail ends the shard."""
    current_key, members = None, {}
    try:
        with as_path(path).open("rb") as fileobj, tarfile.open(fileobj=fileobj, mode="r:*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = os.path.basename(info.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(info.name), key)
                if key != current_key:
                    if current_key is not None:
                        yield current_key, members
                    current_key, members = key, {}
                ext = ext.lower()
                if ext in image_keys:
                    members["__has_image__"] = b"1"
                if ext in wanted:
                    members[ext] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        log.warning(f"{path}: unreadable after sample {current_key!r} ({error}); rest of shard skipped")
        return
    if current_key is not None:
        yield current_key, members


# ---- taxonomy --------------------------------------------------------------------------------------


def name_key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def read_taxa_lookup(path: str) -> dict[str, Taxon]:
    """Name -> Taxon from a taxa.csv (local or gs://); keys are `class_name`, scientific and taxonomic names."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"taxa file not found: {path}")
    lookup: dict[str, Taxon] = {}
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        columns = {c.strip().lower() for c in reader.fieldnames or []}
        if not columns & {"genus", "species", "kingdom"}:
            raise ValueError(f"{path} has no taxonomy columns (expected kingdom .. species, common)")
        for line, row in checked_rows(reader, path):
            try:
                taxon = Taxon.from_mapping(row)
            except (TypeError, ValueError) as error:
                log.warning(f"{path}:{line}: skipped ({error})")
                continue
            if taxon.is_empty:
                continue
            lowered = {k.strip().lower(): v for k, v in row.items() if k}
            names = [lowered.get("class_name") or "", taxon.scientific_name, taxon.taxonomic_name]
            for name in names:
                if name and name_key(name) not in lookup:
                    lookup[name_key(name)] = taxon
    return lookup


def checked_rows(reader: csv.DictReader, path: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) of a CSV whose every row has as many fields as its header.

    A row with more fields (an unquoted comma in a common name) or fewer (ranks left off its
    end) would shift its taxonomy into the wrong columns: that is refused, not guessed at.
    """
    width = len(reader.fieldnames or [])
    for row in reader:
        fields = width + len(row.get(None, ())) - sum(value is None for value in row.values())
        if fields != width:
            hint = ("quote fields that contain a comma" if fields > width
                    else "leave missing ranks as empty fields, not off the end of the row")
            raise ValueError(f"{path}:{reader.line_num}: {fields} fields where the header has {width} ({hint})")
        yield reader.line_num, row


def attach_taxa(data: EvalData, taxa_csv: str) -> int:
    """Gives classes their taxonomy where the table names them; returns how many matched."""
    lookup = read_taxa_lookup(taxa_csv)
    matched = 0
    for i, cls in enumerate(data.classes):
        taxon = lookup.get(name_key(cls.name))
        if taxon is not None:
            data.classes[i] = dataclasses.replace(cls, taxon=taxon)
            matched += 1
    if matched < len(data.classes):
        missing = [c.name for c in data.classes if c.taxon is None]
        log.warning(f"{data.name}: {len(missing)} of {len(data.classes)} classes not in {taxa_csv} "
                    f"(e.g. {missing[0]!r}); those use their directory name as text")
    return matched


def default_taxa_file(root: str) -> str | None:
    folder = as_path(root)
    for candidate in (folder / TAXA_FILE, folder.parent / TAXA_FILE):
        if candidate.is_file():
            return os.fspath(candidate)
    return None


def open_eval_data(spec: str, *, name: str | None = None, taxa: str | None = None,
                   label_key: str | None = None, tfds_data_dir: str | None = None,
                   tfds_download: bool = False) -> EvalData:
    """Opens `folder:PATH`, `tfds:NAME[:SPLIT]` or `shards:PATTERN` (a bare directory, also gs://, means folder:)."""
    kind, _, target = spec.partition(":")
    if kind not in SOURCE_KINDS and as_path(spec).is_dir():
        kind, target = "folder", spec
    if kind == "folder":
        data: EvalData = FolderData(target, name)
        taxa = taxa or default_taxa_file(target)
    elif kind == "tfds":
        dataset, _, split = target.partition(":")
        data = TfdsData(dataset, split or None, data_dir=tfds_data_dir, download=tfds_download, name=name)
    elif kind == "shards":
        data = ShardData(target, label_key or DEFAULT_LABEL_KEY, name)
        taxa = taxa or default_taxa_file(os.path.dirname(data.paths[0]))
    else:
        raise ValueError(f"unknown data source {spec!r}; use folder:PATH, tfds:NAME[:SPLIT] or shards:PATTERN")
    if taxa:
        attach_taxa(data, taxa)
    log.debug(f"{data.name}: {len(data)} images in {len(data.classes)} classes from {spec}"
              f"{f', taxonomy from {taxa}' if taxa else ''}")
    return data
