"""Where shard indexes are kept: beside the shard, else in a cache directory keyed by path, size and mtime.

An index is valid while its shard keeps the size and mtime it was built from; a stale or
foreign one is a cache miss. The data directory comes first, so the indexes of a dataset
travel with it; where it is read-only (a public bucket, a read-only mount) they go to
`$BIOCLIP_JAX_INDEX_CACHE` or `~/.cache/bioclip_jax/shard_index`, local or gs://.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from typing import Sequence

from etils import epath

from bioclip_jax.data.shard_index import INDEX_SUFFIX, ShardIndex, build_shard_index, shard_stat, unreadable
from bioclip_jax.paths import as_path, is_remote, write_atomically

CACHE_DIR_ENV = "BIOCLIP_JAX_INDEX_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/bioclip_jax/shard_index"


def default_cache_dir() -> str:
    return os.path.expanduser(os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR))


def _cache_paths(path: str, size: int, mtime: float, cache_dir: str | None) -> list[epath.Path]:
    """Beside the shard first, then the cache directory (local or gs://; named by path, size and mtime)."""
    digest = hashlib.sha256(f"{path}|{size}|{mtime}".encode()).hexdigest()[:32]
    name = epath.Path(path).name
    return [epath.Path(path + INDEX_SUFFIX),
            as_path(cache_dir or default_cache_dir()) / f"{name}.{digest}{INDEX_SUFFIX}"]


def _read_cached(candidate: epath.Path, path: str, size: int, mtime: float) -> ShardIndex | None:
    try:
        index = ShardIndex.from_json(candidate.read_text(), path)
    except Exception:  # noqa: BLE001 - missing, unreadable or foreign: a cache miss (gfile raises non-OSError types)
        return None
    return index if (index.size, index.mtime) == (size, mtime) else None


def load_or_build_index(path: str, cache_dir: str | None = None) -> ShardIndex:
    """The cached index if still valid (same size and mtime), else a fresh scan, cached."""
    try:
        size, mtime = shard_stat(path)
    except OSError as error:
        return unreadable(path, error)
    candidates = _cache_paths(path, size, mtime, cache_dir)
    for candidate in candidates:
        cached = _read_cached(candidate, path, size, mtime)
        if cached is not None:
            return cached
    index = build_shard_index(path)
    if index.problem is None:
        for candidate in candidates:
            try:
                if not is_remote(candidate):
                    candidate.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(candidate, index.to_json())  # concurrent hosts never read half an index
                break
            except Exception:  # noqa: BLE001 - read-only data directory (any filesystem's error): try the cache dir
                continue
    return index


def index_shards(paths: Sequence[str], cache_dir: str | None = None, num_threads: int = 8) -> list[ShardIndex]:
    """Indexes of all shards, scanned in parallel (I/O bound) where not cached."""
    if len(paths) <= 1 or num_threads <= 1:
        return [load_or_build_index(p, cache_dir) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(paths))) as pool:
        return list(pool.map(lambda p: load_or_build_index(p, cache_dir), paths))
