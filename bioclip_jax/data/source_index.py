"""One memory-mapped index of all the shards of a source, shared by every process on a host.

At TreeOfLife-200M scale the shard indexes hold 200M (start, end) byte ranges, 3.2 GB
as int64: parsed from JSON into every training process and pickled into every Grain
worker, that is 3.2 GB (and the parsing) per process. So the first process joins them
into one file of little-endian int64 pairs (`<key>.bin`) beside a small JSON of
per-shard facts (`<key>.json`), in a local cache directory, keyed by every shard's
path, size and mtime. Every process maps the file read-only: its pages are the kernel's
page cache, shared by all processes and workers and read only where samples are read,
and a pickled source carries the file's name, not the index.

Sources with an unreadable shard are not joined (the problem may be passing); nor are
they where no local directory is writable: their indexes stay in memory, as before.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import mmap
import os
from typing import Sequence

import numpy as np

from bioclip_jax.data import shard_index
from bioclip_jax.data.index_cache import default_cache_dir, index_shards
from bioclip_jax.data.shard_index import ShardIndex
from bioclip_jax.paths import atomic_local_file, expand_user, is_remote, write_atomically

FORMAT = "bioclip_jax.source_index"
VERSION = 1
SUBDIRECTORY = "sources"
_PAIR = np.dtype("<i8")

log = logging.getLogger(__name__)


def index_directory(cache_dir: str | None) -> str:
    """Where joined indexes go: the index cache directory if it is local, else the default local one."""
    base = cache_dir if cache_dir and not is_remote(cache_dir) else default_cache_dir()
    return os.path.join(expand_user(base), SUBDIRECTORY)


def _stats(paths: Sequence[str], num_threads: int) -> list[tuple[int, float] | None]:
    def stat(path: str):
        try:
            return shard_index.shard_stat(path)
        except OSError:
            return None

    if len(paths) <= 1 or num_threads <= 1:
        return [stat(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(paths))) as pool:
        return list(pool.map(stat, paths))


def _key(paths: Sequence[str], stats: Sequence[tuple[int, float]]) -> str:
    digest = hashlib.sha256(f"{FORMAT} {VERSION}\n".encode())
    for path, (size, mtime) in zip(paths, stats):
        digest.update(f"{path}|{size}|{mtime!r}\n".encode())
    return digest.hexdigest()[:32]


def open_mapped(meta_path: str) -> list[ShardIndex]:
    """The shard indexes of a joined index; their starts/ends are views of the read-only mapped file."""
    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{meta_path} is not a bioclip_jax source index of this version")
    total = sum(shard["count"] for shard in meta["shards"])
    if total:
        pairs = np.memmap(meta_path[: -len(".json")] + ".bin", dtype=_PAIR, mode="r", shape=(total, 2))
        mapping = getattr(pairs, "_mmap", None)
        if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            mapping.madvise(mmap.MADV_RANDOM)  # shuffled reads: no read-around of 32 pages per sample
    else:
        pairs = np.zeros((0, 2), dtype=_PAIR)
    indexes, first = [], 0
    for shard in meta["shards"]:
        rows = pairs[first : first + shard["count"]]
        first += shard["count"]
        indexes.append(ShardIndex(shard["path"], shard["size"], shard["mtime"], rows[:, 0], rows[:, 1],
                                  shard["num_members"], shard["truncated_sample"], shard["truncated_key"]))
    return indexes


def _write(directory: str, key: str, indexes: Sequence[ShardIndex]) -> str:
    """Writes `<key>.bin` then `<key>.json`, each appearing whole; returns the JSON's path."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, key)
    meta = {"format": FORMAT, "version": VERSION, "shards": [
        {"path": ix.path, "size": ix.size, "mtime": ix.mtime, "count": len(ix), "num_members": ix.num_members,
         "truncated_sample": ix.truncated_sample, "truncated_key": ix.truncated_key} for ix in indexes]}
    with atomic_local_file(base + ".bin") as temporary, open(temporary, "wb") as f:
        for index in indexes:
            f.write(np.stack([index.starts, index.ends], axis=1).astype(_PAIR).tobytes())
    write_atomically(base + ".json", json.dumps(meta))
    return base + ".json"


def load_source_index(paths: Sequence[str], cache_dir: str | None = None,
                      num_threads: int = 8) -> tuple[list[ShardIndex], str | None]:
    """(shard indexes, the joined index's JSON path, or None where the indexes are held in memory)."""
    stats = _stats(paths, num_threads)
    directory = index_directory(cache_dir)
    key = _key(paths, stats) if None not in stats else None
    meta_path = os.path.join(directory, f"{key}.json")
    if key is not None and os.path.exists(meta_path):
        try:
            return open_mapped(meta_path), meta_path
        except (OSError, ValueError, KeyError) as error:
            log.warning("rebuilding the source index %s: %s", meta_path, error)
    indexes = index_shards(paths, cache_dir, num_threads)
    if key is None or any(index.problem for index in indexes):
        return indexes, None
    try:
        meta_path = _write(directory, key, indexes)
    except OSError as error:
        log.warning("keeping the shard index in memory: cannot write it to %s (%s)", directory, error)
        return indexes, None
    return open_mapped(meta_path), meta_path
