"""ArrayRecord copies of tar shards: one record per sample, read back as the same dicts.

ArrayRecord gives Grain native random access with no index to build, at the cost of
one conversion pass. A record holds the sample key and every member as
length-prefixed fields (no pickle, so reading untrusted files cannot run code):

    b"BCJS" | u32 field count | per field: u16 name length | name | u64 size | bytes

`ArrayRecordSampleSource` returns exactly what `TarShardSource` returns for the
same sample (`__shard__` numbers the ArrayRecord files instead of the tars).
The ArrayRecord reader (C++) opens local files only: on TPU VMs read converted
files through a read-only gcsfuse mount, or train on the tar shards in gs:// directly.
Conversion may write to gs:// (each file is written locally, then uploaded).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from array_record.python import array_record_module
from etils import epath
from grain import sources

from bioclip_jax.data import shard_index
from bioclip_jax.data.tar_source import ERROR, UNREADABLE_SHARD, error_sample
from bioclip_jax.paths import atomic_local_file, is_remote

RECORD_MAGIC = b"BCJS"
FILE_NAME = "shard-{:06d}.array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: what Grain's random access wants
_COUNT = struct.Struct("<I")
_NAME = struct.Struct("<H")
_SIZE = struct.Struct("<Q")


def encode_sample(sample: dict[str, Any]) -> bytes:
    """Key and members of a sample dict (the `__dunder__` fields other than the key are dropped)."""
    fields = [("__key__", str(sample["__key__"]).encode("utf-8"))]
    fields += [(name, bytes(value)) for name, value in sample.items() if not name.startswith("__")]
    parts = [RECORD_MAGIC, _COUNT.pack(len(fields))]
    for name, value in fields:
        encoded = name.encode("utf-8")
        parts += [_NAME.pack(len(encoded)), encoded, _SIZE.pack(len(value)), value]
    return b"".join(parts)


def decode_sample(record: bytes) -> dict[str, Any]:
    """Inverse of `encode_sample`; raises ValueError for anything malformed."""
    view = memoryview(record)
    if view[:4] != RECORD_MAGIC:
        raise ValueError("record does not start with the bioclip_jax sample magic")
    try:
        (count,), offset = _COUNT.unpack_from(view, 4), 4 + _COUNT.size
        sample: dict[str, Any] = {}
        for _ in range(count):
            (name_len,) = _NAME.unpack_from(view, offset)
            offset += _NAME.size
            name = bytes(view[offset : offset + name_len]).decode("utf-8")
            offset += name_len
            (size,) = _SIZE.unpack_from(view, offset)
            offset += _SIZE.size
            if offset + size > len(view):
                raise ValueError(f"malformed sample record: field {name!r} runs past its end")
            sample[name] = bytes(view[offset : offset + size])
            offset += size
    except (struct.error, UnicodeDecodeError) as error:
        raise ValueError(f"malformed sample record: {error}") from None
    if offset != len(view) or "__key__" not in sample:
        raise ValueError("malformed sample record: trailing bytes or no key")
    sample["__key__"] = sample["__key__"].decode("utf-8")
    return sample


@dataclasses.dataclass
class ConversionReport:
    paths: list[str]
    written: int
    dropped: dict[str, int]
    dropped_examples: dict[str, list[str]]


def _write_file(path: epath.Path, records: Iterable[bytes]) -> None:
    """Appears under its name only once complete (the C++ writer needs a local file, also for gs://)."""
    with atomic_local_file(path) as temporary:
        writer = array_record_module.ArrayRecordWriter(temporary, WRITER_OPTIONS)
        try:
            for record in records:
                writer.write(record)
        finally:
            writer.close()


def convert_to_array_record(source: Sequence[dict[str, Any]], out_dir: str, records_per_file: int = 10_000,
                            progress: Callable[[Iterable], Iterable] = iter) -> ConversionReport:
    """Copies every readable sample of `source`, in order, into `shard-%06d.array_record` files.

    Samples the source could not read (truncated tar, unreadable shard) are dropped
    and counted; images and captions are copied as they are (the pipeline checks them).
    """
    if records_per_file <= 0:
        raise ValueError(f"records_per_file must be positive, got {records_per_file}")
    out = shard_index.as_path(out_dir)
    if not is_remote(out):  # gs:// has no directories to make
        out.mkdir(parents=True, exist_ok=True)
    dropped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    pending: list[bytes] = []
    paths: list[str] = []
    written = 0

    def flush() -> None:
        path = out / FILE_NAME.format(len(paths))
        _write_file(path, pending)
        paths.append(os.fspath(path))
        pending.clear()

    for index in progress(range(len(source))):
        sample = source[index]
        if ERROR in sample:
            dropped[sample[ERROR]] = dropped.get(sample[ERROR], 0) + 1
            examples.setdefault(sample[ERROR], []).append(sample["__key__"])
            continue
        pending.append(encode_sample(sample))
        written += 1
        if len(pending) == records_per_file:
            flush()
    if pending or not paths:
        flush()
    return ConversionReport(paths, written, dropped, {k: v[:5] for k, v in examples.items()})


class ArrayRecordSampleSource:
    """Random access over converted files with the `TarShardSource` sample dicts."""

    def __init__(self, shards: str | Sequence[str]):
        self.shard_paths = shard_index.expand_shard_pattern(shards)
        remote = [path for path in self.shard_paths if is_remote(path)]
        if remote:
            raise ValueError(f"ArrayRecord files are read from local paths only, not {remote[0]}: mount the "
                             "bucket read-only with gcsfuse and pass the mount path, or train on the tar shards "
                             "in gs:// directly")
        self._problems: dict[str, str] = {}
        counts = []
        for path in self.shard_paths:
            try:
                reader = array_record_module.ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()
            except Exception as error:  # the C++ reader raises RuntimeError/ValueError variants
                self._problems[path] = f"cannot read {path} as an ArrayRecord file: {error}"
                counts.append(0)
        self._first = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
        readable = [f"{path}[0:{n}]" for path, n in zip(self.shard_paths, counts) if n > 0]
        self._records = sources.ArrayRecordDataSource(readable) if readable else None

    @property
    def problems(self) -> dict[str, str]:
        return dict(self._problems)

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, index) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        name = f"{os.path.basename(self.shard_paths[shard])}#{index - int(self._first[shard])}"
        try:
            sample = decode_sample(self._records[index])
        except Exception as error:  # I/O errors surface from C++ as RuntimeError
            return error_sample(name, shard, UNREADABLE_SHARD, f"cannot read record {name}: {error}")
        sample["__shard__"] = shard
        return sample

    def __repr__(self) -> str:
        return f"ArrayRecordSampleSource({len(self.shard_paths)} files, {len(self)} samples)"
