"""Random access to webdataset tar shards, for Grain (`MapDataset.source(TarShardSource(...))`).

`source[i]` seeks to sample i's byte range (from the cached shard index), reads it
in one call and returns `{"__key__": key, "__shard__": shard number, ext: bytes, ...}`.
Reading never raises for bad data: a sample that cannot be read comes back as
`{"__key__", "__shard__", "__error__": reason, "__detail__": text}`, with reason
"truncated_tar" or "unreadable_shard", so the pipeline can skip and count it.

The shard indexes are one memory-mapped file shared by the processes of a host (see
`source_index`). File handles are opened lazily, one per shard per process (reads on one handle
are serialised by a lock, since Grain calls from several threads), dropped when
pickled into a Grain worker process, and reopened there. Shards may be local files
(also a read-only gcsfuse mount) or `gs://` objects, read by ranged requests.
"""

from __future__ import annotations

import collections
import io
import os
import tarfile
import threading
from typing import Any, Sequence

import numpy as np

from bioclip_jax.data import shard_index, source_index
from bioclip_jax.data.shard_patterns import expand_shard_pattern
from bioclip_jax.data.tar_headers import members_of

ERROR = "__error__"
DETAIL = "__detail__"
TRUNCATED_TAR = "truncated_tar"
UNREADABLE_SHARD = "unreadable_shard"


def error_sample(key: str, shard: int, reason: str, detail: str) -> dict[str, Any]:
    """The stand-in for a sample that could not be read."""
    return {"__key__": key, "__shard__": shard, ERROR: reason, DETAIL: detail}


class _OpenFile:
    def __init__(self, fileobj):
        self.fileobj = fileobj
        self.lock = threading.Lock()
        self.closed = False


class ShardFiles:
    """At most `max_open` open shard files per process, least recently used closed first."""

    def __init__(self, paths: Sequence[str], sizes: Sequence[int], max_open: int = 256):
        self.paths = list(paths)
        self.sizes = list(sizes)
        self.max_open = max(1, max_open)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[int, _OpenFile] = collections.OrderedDict()

    def _handle(self, shard: int) -> _OpenFile:
        if self._pid != os.getpid():  # forked: a shared file offset would interleave seeks
            self._reset()
        with self._lock:
            handle = self._open.get(shard)
            if handle is not None:
                self._open.move_to_end(shard)
                return handle
            handle = _OpenFile(self._open_checked(shard))
            self._open[shard] = handle
            while len(self._open) > self.max_open:
                _, evicted = self._open.popitem(last=False)
                with evicted.lock:
                    evicted.closed = True
                    evicted.fileobj.close()
            return handle

    def _open_checked(self, shard: int):
        path = self.paths[shard]
        size, _ = shard_index.shard_stat(path)
        if size != self.sizes[shard]:
            raise OSError(f"shard {path} changed size since it was indexed ({self.sizes[shard]} -> {size} bytes)")
        return shard_index.open_for_reads(path)

    def read(self, shard: int, start: int, length: int) -> bytes:
        while True:
            handle = self._handle(shard)
            with handle.lock:
                if handle.closed:
                    continue  # evicted between lookup and lock; reopen
                handle.fileobj.seek(start)
                data = handle.fileobj.read(length)
            if len(data) != length:
                raise OSError(f"short read from {self.paths[shard]} at byte {start}: {len(data)} of {length}")
            return data

    def close(self) -> None:
        with self._lock:
            for handle in self._open.values():
                with handle.lock:
                    handle.closed = True
                    handle.fileobj.close()
            self._open.clear()

    def __getstate__(self):
        return {"paths": self.paths, "sizes": self.sizes, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()


def parse_sample(blob: bytes, key: str | None = None) -> tuple[str, dict[str, bytes]]:
    """Members of one sample's byte range -> (key, {extension: payload})."""
    listing = members_of(io.BytesIO(blob), len(blob), expect_end_block=False)
    members: dict[str, bytes] = {}
    for _, name, start, size, is_file in listing:
        split = shard_index.split_member_name(name) if is_file else None
        if split is None:
            continue
        member_key, extension = split
        key = member_key if key is None else key
        if member_key == key:
            if start + size > len(blob):
                raise tarfile.ReadError(f"member {name} runs past the indexed byte range")
            members[extension] = blob[start : start + size]
    if key is None:
        raise tarfile.ReadError("no sample member in the indexed byte range")
    return key, members


class TarShardSource:
    """All samples of all shards, in shard order, addressable by a global index."""

    def __init__(self, shards: str | Sequence[str], *, cache_dir: str | None = None,
                 index_threads: int = 8, max_open_files: int = 256):
        self.shard_paths = expand_shard_pattern(shards)
        self.indexes, self._index_file = source_index.load_source_index(self.shard_paths, cache_dir, index_threads)
        counts = np.array([len(index) for index in self.indexes], dtype=np.int64)
        self._first = np.concatenate([[0], np.cumsum(counts)])
        self._files = ShardFiles(self.shard_paths, [ix.size for ix in self.indexes], max_open_files)

    @property
    def problems(self) -> dict[str, str]:
        """Shard path -> what is wrong with it (unreadable, or truncated and where)."""
        found = {}
        for index in self.indexes:
            if index.problem:
                found[index.path] = index.problem
            elif index.truncated:
                found[index.path] = (f"{index.path} is truncated or damaged after {len(index) - 1} complete "
                                     f"samples (sample {index.truncated_key!r} is cut)")
        return found

    def __len__(self) -> int:
        return int(self._first[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (shard number, sample number within the shard)."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self._first, index, side="right")) - 1
        return shard, index - int(self._first[shard])

    def __getitem__(self, index) -> dict[str, Any]:
        shard, local = self.locate(int(index))
        ix = self.indexes[shard]
        name = f"{os.path.basename(ix.path)}#{local}"
        if local == ix.truncated_sample:
            return error_sample(ix.truncated_key or name, shard, TRUNCATED_TAR,
                                f"sample cut off by the truncation of {ix.path}")
        start, end = int(ix.starts[local]), int(ix.ends[local])
        try:
            key, members = parse_sample(self._files.read(shard, start, end - start))
        except (OSError, tarfile.TarError) as error:
            return error_sample(name, shard, UNREADABLE_SHARD, f"cannot read sample {local} of {ix.path}: {error}")
        return {"__key__": key, "__shard__": shard, **members}

    def close(self) -> None:
        self._files.close()

    def __getstate__(self):
        """A mapped index travels as its file name (workers map the same pages), not as its arrays."""
        state = dict(self.__dict__)
        if self._index_file is not None:
            del state["indexes"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self._index_file is not None:
            self.indexes = source_index.open_mapped(self._index_file)

    def __repr__(self) -> str:
        return f"TarShardSource({len(self.shard_paths)} shards, {len(self)} samples)"
