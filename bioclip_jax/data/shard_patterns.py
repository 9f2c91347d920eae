"""Finds the shards an open_clip-style pattern names: brace ranges and lists, globs, directories, `::`.

Every path goes through `etils.epath`, so a pattern may name local files or `gs://bucket/...`.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

from etils import epath

from bioclip_jax.data.braces import expand_braces
from bioclip_jax.data.shard_index import INDEX_SUFFIX
from bioclip_jax.paths import expand_user

SHARD_EXTENSIONS = (".tar", ".array_record")

_GLOB_CHARS = re.compile(r"[*?\[]")


class ShardNotFoundError(FileNotFoundError):
    """A shard (or the files a pattern should match) does not exist."""


def _files_in_directory(directory: epath.Path) -> list[epath.Path]:
    for extension in SHARD_EXTENSIONS:
        found = sorted(directory.glob(f"*{extension}"))
        if found:
            return found
    raise ShardNotFoundError(f"directory {directory} holds no {' or '.join(SHARD_EXTENSIONS)} files")


def expand_shard_pattern(pattern: str | Sequence[str]) -> list[str]:
    """Every shard path that an open_clip-style pattern names, in order, each checked to exist.

    Accepts brace ranges and lists (`shard-{000000..000159}.tar`, `{train,extra}`),
    several patterns joined by `::`, globs, plain directories (their `*.tar`, else
    `*.array_record`), and lists of any of these.
    """
    if not isinstance(pattern, str):
        return [path for item in pattern for path in expand_shard_pattern(item)]
    if not pattern.strip():
        raise ValueError("empty shard pattern")
    paths: list[str] = []
    missing: list[str] = []
    for part in pattern.split("::"):
        for expanded in expand_braces(part.strip()):
            expanded = expand_user(expanded)
            path = epath.Path(expanded)
            if _GLOB_CHARS.search(expanded):
                parent, glob = _split_glob(expanded)
                matches = sorted(epath.Path(parent).glob(glob)) if epath.Path(parent).exists() else []
                matches = [m for m in matches if not m.name.endswith(INDEX_SUFFIX)]  # our own caches
                if not matches:
                    raise ShardNotFoundError(f"shard pattern {expanded} matches no files")
                paths.extend(os.fspath(m) for m in matches)
            elif path.is_dir():
                paths.extend(os.fspath(p) for p in _files_in_directory(path))
            elif path.exists():
                paths.append(os.fspath(path))
            else:
                missing.append(expanded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardNotFoundError(f"shard {missing[0]} does not exist{more}, from pattern {pattern!r}")
    return paths


def _split_glob(path: str) -> tuple[str, str]:
    """Splits at the last `/` before the first glob character: (fixed parent, glob)."""
    first = _GLOB_CHARS.search(path).start()
    cut = path.rfind("/", 0, first)
    return (path[:cut] or "/", path[cut + 1 :]) if cut >= 0 else (".", path)
