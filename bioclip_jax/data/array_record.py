"""ArrayRecord copies of tar shards: one record per sample, read back as the same dicts.

ArrayRecord gives Grain native random access with no index to build (`ingest.convert`
writes the copies). A record holds the sample key and every member as
length-prefixed fields (no pickle, so reading untrusted files cannot run code):

    b"BCJS" | u32 field count | per field: u16 name length | name | u64 size | bytes

`ArrayRecordSampleSource` returns exactly what `TarShardSource` returns for the
same sample (`__shard__` numbers the ArrayRecord files instead of the tars).
The ArrayRecord reader (C++) opens local files only: on TPU VMs read converted
files through a read-only gcsfuse mount, or train on the tar shards in gs:// directly.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Sequence

import numpy as np
from array_record.python import array_record_module
from grain import sources

from bioclip_jax.data.shard_patterns import expand_shard_pattern
from bioclip_jax.data.tar_source import UNREADABLE_SHARD, error_sample
from bioclip_jax.paths import is_remote

RECORD_MAGIC = b"BCJS"
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


class ArrayRecordSampleSource:
    """Random access over converted files with the `TarShardSource` sample dicts."""

    def __init__(self, shards: str | Sequence[str]):
        self.shard_paths = expand_shard_pattern(shards)
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
            except Exception as error:  # noqa: BLE001 - the C++ reader raises RuntimeError/ValueError variants
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
        except Exception as error:  # noqa: BLE001 - I/O errors surface from C++ as RuntimeError
            return error_sample(name, shard, UNREADABLE_SHARD, f"cannot read record {name}: {error}")
        sample["__shard__"] = shard
        return sample

    def __repr__(self) -> str:
        return f"ArrayRecordSampleSource({len(self.shard_paths)} files, {len(self)} samples)"
