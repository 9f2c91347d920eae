"""Paths that are local or in a bucket (`gs://bucket/run`): the few places where the two differ.

Every user-nameable path goes through `etils.epath.Path`, the type Orbax uses, so the
same code reads and writes a local folder or a bucket (gcsfs underneath). What differs:
- Only local paths are made absolute: `os.path.abspath("gs://b/x")` is a local
  folder "gs:" in the working directory.
- A bucket object cannot be appended to or renamed cheaply, but an upload appears
  whole or not at all; locally a file is written beside its target and renamed.
- gcsfs remembers a folder's listing for the life of the process, so files written
  since by another process (or by tensorstore, which Orbax uses for arrays) would stay
  invisible; `uncached` forgets those listings before a read that must be fresh.
- Libraries that only write local files (matplotlib, json.dump) write a bucket path
  through `local_stand_in`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
    """`gs://...` and other URLs, as opposed to local (or gcsfuse-mounted) files."""
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
    """Local paths made absolute (Orbax wants that); bucket URLs kept as they are."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def uncached(path: PathLike) -> epath.Path:
    """`path`, after dropping gcsfs's cached directory listings (all of them: children go stale too)."""
    path = epath.Path(path)
    if is_remote(path):
        from etils.epath import backend  # noqa: PLC0415 - the gcsfs instance epath itself uses

        backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()
    return path


def write_atomically(path: PathLike, data: bytes | str) -> None:
    """Writes the whole file so that a reader never sees half of it (and honours the umask)."""
    path = epath.Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        path.write_bytes(payload)  # an upload becomes visible only once complete
        return
    temporary = path.parent / (path.name + ".tmp")
    temporary.write_bytes(payload)
    os.replace(temporary, path)


def append_line(path: PathLike, line: str) -> None:
    """Adds one line: a single append locally (safe beside other appenders), a rewrite in a bucket.

    The bucket object is read fresh first, so lines another process added are kept
    (two writers at the same instant can still lose one line).
    """
    path = epath.Path(path)
    if not is_remote(path):
        with path.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        return
    path = uncached(path)
    before = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(before + line + "\n", encoding="utf-8")


@contextlib.contextmanager
def local_stand_in(path: PathLike) -> Iterator[str]:
    """A local file name to write `path` (and files beside it) with local-only writers.

    `path` itself when local; for a bucket path, a name in a temporary folder whose
    files are uploaded beside `path` when the block ends without error.
    """
    if not is_remote(path):
        yield os.fspath(path)
        return
    target = epath.Path(path)
    with tempfile.TemporaryDirectory(prefix="bioclip_jax_upload_") as staging:
        yield os.path.join(staging, target.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(staging)):
            (target.parent / name).write_bytes(pathlib.Path(staging, name).read_bytes())
