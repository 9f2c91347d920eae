"""The images a prediction run reads, streamed from whatever the user names: nothing is listed whole first.

A source is one of
    a folder (local or gs://)   its image files, recursively, in `image_items.walk_image_files` order;
    a manifest                  `.csv` with a path column, or `.txt` with one path a line (blank lines and
                                `#` comments skipped); relative entries are resolved against the manifest's
                                folder; manifest and entries may be local or gs://;
    training shards             webdataset `.tar` and ArrayRecord `.array_record` files as make-shards and
                                convert-shards write them, also as a brace or glob pattern
                                (`train/shard-{000000..000009}.tar`, `train/*.tar`);
    an image file               anything else that exists.

Item keys: a file's path as listed (for manifest entries: the entry joined to the manifest's folder);
a shard sample's own key (`__key__`), which make-shards' catalog.csv maps back to the source image
and its taxonomy, and which TreeOfLife-10M's keys make unique across shards.

Listing never fails on bad data: a manifest entry that does not exist, a shard sample without an image
or a damaged shard becomes an item whose `open` raises, so the embedder skips it and reports why.
Every `open` is a module-level function in a `functools.partial`, so items can be pickled into
worker processes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import logging
import os
import tarfile
from typing import Callable, Iterable, Iterator, Sequence

from array_record.python import array_record_module

from bioclip_jax import transforms
from bioclip_jax.data.array_record import decode_sample
from bioclip_jax.data.eval_sources import SHARD_IMAGE_KEYS
from bioclip_jax.data.image_items import ImageItem, walk_image_files
from bioclip_jax.data.shard_index import open_for_scan, shard_stat, split_member_name
from bioclip_jax.data.shard_patterns import ShardNotFoundError, expand_shard_pattern
from bioclip_jax.data.tar_headers import members_of
from bioclip_jax.paths import as_path, expand_user, is_remote, open_text

log = logging.getLogger(__name__)

PATH_COLUMNS = ("path", "filepath", "file_path", "file_name", "filename", "file", "image", "image_path")
_PATTERN_CHARS = ("{", "*", "?", "[", "::")
_RECORDS_PER_READ = 64  # ArrayRecord records fetched per call: a few MB of images at a time


class UnreadableInput(ValueError):
    """What a listed item that cannot be an image raises when opened (the embedder reports it as the reason)."""


def _open_bytes(data: bytes):
    return transforms.open_rgb(io.BytesIO(data))


def _unreadable(reason: str):
    raise UnreadableInput(reason)


def file_input(path: str) -> ImageItem:
    """An image file (local or gs://), opened as RGB when the embedder gets to it."""
    return ImageItem(path, functools.partial(transforms.open_rgb, path))


def bytes_input(key: str, data: bytes) -> ImageItem:
    return ImageItem(key, functools.partial(_open_bytes, data))


def unreadable_input(key: str, reason: str) -> ImageItem:
    return ImageItem(key, functools.partial(_unreadable, reason))


# ---- which sources exist, and what each is --------------------------------------------------------------


def _is_pattern(source: str) -> bool:
    return any(char in source for char in _PATTERN_CHARS)


def _named_paths(source: str) -> list[str]:
    """The files and folders a source names: itself when it exists, else what its brace or glob pattern
    matches; none when it names nothing."""
    text = expand_user(source)
    if as_path(text).exists():
        return [text]
    if not _is_pattern(text):
        return []
    try:
        return expand_shard_pattern(text)
    except (ShardNotFoundError, ValueError):
        return []


def missing_sources(sources: Sequence[str]) -> list[str]:
    """The sources that name nothing: no such file or folder, or a pattern that matches no file."""
    return [source for source in sources if not _named_paths(source)]


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _path_column(manifest: str, header: list[str], path_column: str | None) -> int:
    """Position of the column that holds the image paths (chosen by name, case-insensitively)."""
    names = [name.strip().lstrip("\ufeff").lower() for name in header]  # a spreadsheet's UTF-8 mark
    wanted = [path_column.strip().lower()] if path_column else list(PATH_COLUMNS)
    for position, name in enumerate(names):
        if name in wanted:
            return position
    shown = ", ".join(header) or "none"
    if path_column:
        raise ValueError(f"manifest {manifest} has no column {path_column!r} (its columns: {shown})")
    raise ValueError(f"manifest {manifest} has no path column (its columns: {shown}): name one of them with "
                     f"--path-column, or call a column one of {', '.join(PATH_COLUMNS)}")


def _csv_header(manifest: str) -> list[str]:
    with open_text(manifest) as handle:
        return next(csv.reader(handle), [])


@dataclasses.dataclass(frozen=True)
class _Source:
    """One file or folder to read: its items, and their keys alone (cheaper where a format allows)."""
    items: Callable[[], Iterator[ImageItem]]
    keys: Callable[[], Iterator[str]]
    is_shard: bool = False  # a training shard: shared among processes whole, when there are enough of them


def _keys_of(items: Callable[[], Iterator[ImageItem]]) -> Callable[[], Iterator[str]]:
    return lambda: (item.key for item in items())


def _source(path: str, path_column: str | None) -> _Source:
    """How to stream one existing file or folder; a manifest's header and an ArrayRecord's place are checked now."""
    if as_path(path).is_dir():
        items = functools.partial(_folder_items, path)
        return _Source(items, _keys_of(items))
    suffix = _suffix(path)
    if suffix == ".csv":
        items = functools.partial(_csv_items, path, _path_column(path, _csv_header(path), path_column))
    elif suffix == ".txt":
        items = functools.partial(_txt_items, path)
    elif suffix == ".tar":
        return _Source(functools.partial(_tar_items, path), functools.partial(_tar_keys, path), is_shard=True)
    elif suffix == ".array_record":
        if is_remote(path):
            raise ValueError(f"ArrayRecord files are read from local paths only, not {path}: mount the bucket "
                             f"with gcsfuse and pass the mount path, or pass the tar shards in gs:// instead")
        items = functools.partial(_array_record_items, path)
        return _Source(items, _keys_of(items), is_shard=True)
    else:
        items = functools.partial(iter, [file_input(path)])
    return _Source(items, _keys_of(items))


class ImageInputs:
    """The images the sources name (see the module docstring), listed afresh, from the start, on every call.

    Mistakes in the arguments (a CSV manifest without a path column, an ArrayRecord file in gs://) raise
    ValueError here, before any image is read; sources that do not exist are skipped with one warning here
    (`missing_sources` names them up front).

    Processes share the inputs without overlap and together cover all of them. Training shards go whole
    to one process each (round robin) when there are at least as many shards as processes, so that no
    process reads another's shard; everything else (and shards, when they are fewer) is dealt out item by
    item (`process_slice`): each process still lists those, but opens only its own.
    """

    def __init__(self, sources: Sequence[str], *, path_column: str | None = None):
        self._sources: list[_Source] = []
        for source in sources:
            paths = _named_paths(source)
            if not paths:
                log.warning(f"image source not found, skipped: {source}")
            self._sources.extend(_source(path, path_column) for path in paths)

    def items(self, process_index: int = 0, process_count: int = 1) -> Iterator[ImageItem]:
        """This process's images, in order within each source."""
        return self._share(process_index, process_count, lambda source: source.items())

    def keys(self, process_index: int = 0, process_count: int = 1) -> Iterator[str]:
        """The keys of the same images as `items(...)`, without reading them: a tar shard's come from its
        headers alone (its payloads are skipped), which is what a progress bar's count needs."""
        return self._share(process_index, process_count, lambda source: source.keys())

    def _share(self, index: int, count: int, listing: Callable[[_Source], Iterator]) -> Iterator:
        by_shard = count > 1 and sum(source.is_shard for source in self._sources) >= count
        shards = [source for source in self._sources if by_shard and source.is_shard]
        dealt = [source for source in self._sources if not (by_shard and source.is_shard)]
        whole = itertools.chain.from_iterable(map(listing, shards[index::count]))
        return itertools.chain(whole, process_slice(itertools.chain.from_iterable(map(listing, dealt)), index, count))


def iter_image_inputs(sources: Sequence[str], *, path_column: str | None = None) -> Iterator[ImageItem]:
    """Every image the sources name, in order, streamed (`ImageInputs(...).items()`)."""
    return ImageInputs(sources, path_column=path_column).items()


def process_slice(items: Iterable, index: int, count: int) -> Iterator:
    """Process `index` of `count`: every `count`-th item from its own position, so the processes share the
    stream without overlap and together cover all of it (each still lists, but decodes only its own share)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} of {count} processes is out of range: need 0 <= index < count")
    return itertools.islice(items, index, None, count)


# ---- folders and manifests -------------------------------------------------------------------------------


def _folder_items(folder: str) -> Iterator[ImageItem]:
    return (file_input(path) for path in walk_image_files(folder))


def _resolved(manifest: str, entry: str) -> str:
    entry = expand_user(entry)
    if is_remote(entry) or os.path.isabs(entry):
        return entry
    return os.path.join(os.path.dirname(manifest), entry)


def _manifest_item(manifest: str, line: int, entry: str | None) -> ImageItem:
    if not entry:
        return unreadable_input(f"{manifest}:{line}", f"line {line} of {manifest} has no image path")
    return file_input(_resolved(manifest, entry))


def _csv_items(manifest: str, column: int) -> Iterator[ImageItem]:
    with open_text(manifest) as handle:
        rows = csv.reader(handle)
        next(rows, None)  # the header
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue
            entry = row[column].strip() if column < len(row) else None
            yield _manifest_item(manifest, rows.line_num, entry)


def _txt_items(manifest: str) -> Iterator[ImageItem]:
    with open_text(manifest) as handle:
        for line, text in enumerate(handle, start=1):
            entry = text.strip()
            if entry and not entry.startswith("#"):
                yield _manifest_item(manifest, line, entry)


# ---- training shards -------------------------------------------------------------------------------------


def _sample_item(key: str, members: dict[str, bytes], shard: str) -> ImageItem:
    image = next((members[ext] for ext in SHARD_IMAGE_KEYS if ext in members), None)
    if image is None:
        return unreadable_input(key, f"sample {key} of {shard} has no image member ({', '.join(SHARD_IMAGE_KEYS)})")
    return bytes_input(key, image)


def _tar_items(shard: str) -> Iterator[ImageItem]:
    """One item per sample, reading the shard once from front to back; a damaged tail becomes one item."""
    key, members, problem = None, {}, None
    try:
        size, _ = shard_stat(shard)
        with as_path(shard).open("rb") as fileobj, tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for info in tar:
                split = split_member_name(info.name) if info.isfile() else None
                if split is None:
                    continue
                if split[0] != key:
                    if key is not None:
                        yield _sample_item(key, members, shard)
                    key, members = split[0], {}
                extension = split[1].lower()
                if extension in SHARD_IMAGE_KEYS:
                    members[extension] = tar.extractfile(info).read()
            if tar.offset + tarfile.BLOCKSIZE > size:  # tarfile stops quietly where a cut file ends
                problem = "the file ends without the end-of-archive block (truncated)"
    except (tarfile.TarError, OSError, EOFError) as error:
        problem = str(error)
    if key is not None and (members or problem is None):
        yield _sample_item(key, members, shard)
    if problem is not None:
        after = f"after sample {key}" if key is not None else "from its start"
        yield unreadable_input(f"{shard}#rest", f"{shard} cannot be read {after}: {problem}")


def _tar_keys(shard: str) -> Iterator[str]:
    """The sample keys of a tar shard from its headers (payloads skipped); a damaged shard's keys up to the
    damage (this only sizes a progress bar: `_tar_items` reports the damage)."""
    found: list[str] = []

    def collect(members) -> None:
        found.clear()  # members_of starts again with tarfile where the fast reader gives up
        for _, name, _, _, is_file in members:
            split = split_member_name(name) if is_file else None
            if split is not None and (not found or found[-1] != split[0]):
                found.append(split[0])

    try:
        size, _ = shard_stat(shard)
        with open_for_scan(shard) as fileobj:
            members_of(fileobj, size, consume=collect)
    except (tarfile.TarError, OSError) as error:
        log.debug("counting the samples of %s stopped: %s", shard, error)
    return iter(found)


def _array_record_items(shard: str) -> Iterator[ImageItem]:
    """One item per record, a few records read at a time."""
    try:
        reader = array_record_module.ArrayRecordReader(shard)
        count = reader.num_records()
    except Exception as error:  # noqa: BLE001 - the C++ reader raises RuntimeError/ValueError variants
        yield unreadable_input(shard, f"cannot read {shard} as an ArrayRecord file: {error}")
        return
    try:
        for start in range(0, count, _RECORDS_PER_READ):
            stop = min(count, start + _RECORDS_PER_READ)
            try:
                records = reader.read(start, stop)
            except Exception as error:  # noqa: BLE001 - I/O errors surface from C++ as RuntimeError
                yield unreadable_input(f"{shard}#{start}", f"cannot read records {start}..{stop - 1} of {shard}: "
                                                          f"{error}")
                continue
            for position, record in enumerate(records, start=start):
                try:
                    sample = decode_sample(record)
                except ValueError as error:
                    yield unreadable_input(f"{shard}#{position}", f"record {position} of {shard}: {error}")
                    continue
                yield _sample_item(sample["__key__"], sample, shard)
    finally:
        reader.close()
