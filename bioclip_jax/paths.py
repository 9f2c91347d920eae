"""Paths that are local or in a bucket (`gs://bucket/run`): the few places where the two differ.

Every user-nameable path goes through `etils.epath.Path`, the type Orbax uses, so the
same code reads and writes a local folder or a bucket (gcsfs underneath). What differs:
- Only local paths are made absolute: `os.path.abspath("gs://b/x")` is a local
  folder "gs:" in the working directory.
- A bucket object cannot be appended to or renamed cheaply, but an upload appears
  whole or not at all; locally a file is written beside its target, under a name of its
  own, and renamed (`atomic_local_file`, `write_atomically`).
- A line log (metrics.jsonl, config_history.jsonl) is one file locally, appended to. In a
  bucket each appended line is an object of its own under `<name>.d/` (one writer never
  rewrites another's lines), and `read_lines` merges them in the order they were written.
- gcsfs remembers a folder's listing for the life of the process, so files written
  since by another process (or by tensorstore, which Orbax uses for arrays) would stay
  invisible; `uncached` forgets those listings before a read that must be fresh.
- Libraries that only write local files (matplotlib, json.dump) write a bucket path
  through `local_stand_in`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import os
import socket
import tempfile
import time
import uuid
from typing import Callable, Iterator, Union

from etils import epath

from bioclip_jax import deadlines

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
    """`gs://...` and other URLs, as opposed to local (or gcsfuse-mounted) files."""
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> epath.Path:
    """Local paths made absolute (Orbax wants that); bucket URLs kept as they are."""
    return epath.Path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def expand_user(path: PathLike) -> str:
    """A user-given path as text, `~` expanded for local paths only."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.expanduser(text)


def as_path(path: PathLike) -> epath.Path:
    """An epath for a user-given path: local or `gs://bucket/...`."""
    return epath.Path(expand_user(path))


def open_text(path: PathLike) -> io.TextIOWrapper:
    """A UTF-8 text file on any filesystem, newlines left as they are (what the csv module wants)."""
    return io.TextIOWrapper(as_path(path).open("rb"), encoding="utf-8", newline="")


def uncached(path: PathLike) -> epath.Path:
    """`path`, after dropping gcsfs's cached directory listings (all of them: children go stale too)."""
    path = epath.Path(path)
    if is_remote(path):
        from etils.epath import backend  # noqa: PLC0415 - the gcsfs instance epath itself uses

        backend.fsspec_backend.fs(os.fspath(path)).invalidate_cache()
    return path


def _temporary_name(path: PathLike) -> epath.Path:
    """A name beside `path` that no other writer uses: hosts (and processes on one host) that write
    the same file at once each get their own, so none renames or overwrites another's half-written file."""
    path = epath.Path(path)
    return path.parent / f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"


@contextlib.contextmanager
def atomic_local_file(path: PathLike) -> Iterator[str]:
    """A local file name to write `path` through, for writers that need a file name of their own.

    When the block ends without error the file becomes `path` at once: renamed onto it locally,
    uploaded for a bucket path (an upload appears whole or not at all). On error it is removed and
    an earlier `path` stays as it was.
    """
    path = epath.Path(path)
    with naming_the_file(path):
        if is_remote(path):
            with _uploaded_from_staging(path) as staged:
                yield staged
            return
        temporary = os.fspath(_temporary_name(path))
        try:
            yield temporary
            os.replace(temporary, path)
        finally:
            if os.path.lexists(temporary):
                os.remove(temporary)


def write_atomically(path: PathLike, data: bytes | str) -> None:
    """Writes the whole file so that a reader never sees half of it (and honours the umask)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_local_file(path) as temporary, open(temporary, "xb") as handle:
        handle.write(payload)


@contextlib.contextmanager
def naming_the_file(path: PathLike) -> Iterator[None]:
    """An OSError without a file name (a full disk on write: "[Errno 28] No space left on device")
    gets `path`, so that its message says where."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror or str(error), os.fspath(path)) from None


def read_json(path: PathLike):
    """The JSON value in `path`; a file that does not parse raises ValueError naming it."""
    path = epath.Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"{path} is damaged: it does not hold valid JSON ({error})") from None


LINE_PARTS_SUFFIX = ".d"  # WORKDIR/metrics.jsonl.d/ holds a bucket line log's lines


def _parts(path: epath.Path) -> epath.Path:
    return path.parent / (path.name + LINE_PARTS_SUFFIX)


def _read_parts(path: epath.Path, only_writer: str = "") -> list[tuple[epath.Path, list[str]]]:
    """(object, its lines) of a bucket line log's appended objects, oldest first, fetched concurrently
    (a long run has thousands)."""
    parts = _parts(path)
    names = sorted(p.name for p in parts.iterdir()) if parts.is_dir() else []
    names = [name for name in names if not only_writer or f"-{only_writer}-" in name]
    if not names:
        return []
    from etils.epath import backend  # noqa: PLC0415 - the gcsfs instance epath itself uses

    fs = backend.fsspec_backend.fs(os.fspath(parts))
    urls = [os.fspath(parts / name) for name in names]
    contents = fs.cat(urls)  # {path as fsspec spells it: bytes}
    by_name = {key.rsplit("/", 1)[-1]: value for key, value in contents.items()}
    return [(parts / name, by_name[name].decode("utf-8").splitlines()) for name in names]


def append_line(path: PathLike, line: str, writer: str = "line") -> None:
    """Adds one line to a line log: one append locally (whole lines, safe beside other appenders,
    and beside `rewrite_lines`); in a bucket a new object `<path>.d/<time>-<writer>-<random>.jsonl`."""
    path = epath.Path(path)
    with naming_the_file(path):
        if is_remote(path):
            part = _parts(path) / f"{time.time_ns():020d}-{writer}-{uuid.uuid4().hex[:8]}.jsonl"
            deadlines.with_deadline(lambda: part.write_text(line + "\n"), deadlines.timeout_s(),
                                    f"writing a line of {path} (as {part.name})")
            return
        with _locked_for_append(path) as handle:
            handle.write(line + "\n")


def read_lines(path: PathLike) -> list[str]:
    """The lines of a line log, oldest first (a bucket's: the whole object older versions wrote,
    then the appended objects); a missing log has none."""
    path = uncached(path)
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    if is_remote(path):
        for _, part_lines in _read_parts(path):
            lines += part_lines
    return lines


def rewrite_lines(path: PathLike, keep: Callable[[str], bool], writer: str) -> int:
    """Removes the lines `keep` refuses, of those `writer` appended (in a bucket) or of the whole
    file (locally, where a line does not say who wrote it: `keep` decides); returns how many went.

    Locally the file is replaced under the lock appenders take, so no line appended meanwhile
    is lost.
    """
    path = epath.Path(path)
    removed = 0
    with naming_the_file(path):
        if is_remote(path):
            path = uncached(path)
            if path.exists():  # the single object older versions wrote
                lines = path.read_text(encoding="utf-8").splitlines()
                kept = [line for line in lines if keep(line)]
                if len(kept) < len(lines):
                    removed += len(lines) - len(kept)
                    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            for part, part_lines in _read_parts(path, only_writer=writer):
                if not all(keep(line) for line in part_lines):
                    removed += 1
                    part.unlink(missing_ok=True)
            return removed
        if not path.exists():
            return 0
        with _locked_for_append(path) as handle:
            handle.seek(0)
            lines = handle.read().splitlines()
            kept = [line for line in lines if keep(line)]
            if len(kept) < len(lines):
                write_atomically(path, "".join(line + "\n" for line in kept))
            return len(lines) - len(kept)


@contextlib.contextmanager
def _locked_for_append(path: epath.Path):
    """The local file open for appending, under an exclusive lock on the file it names now (if another
    process replaced it while we waited for the lock, the new file is opened and locked instead).
    Where the file system has no locks (some FUSE mounts) the append goes ahead unlocked."""
    while True:
        handle = open(path, "a+", encoding="utf-8")  # closed below
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                yield handle
                return
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                yield handle
                return
        finally:
            handle.close()  # also releases the lock


@contextlib.contextmanager
def local_stand_in(path: PathLike) -> Iterator[str]:
    """A local file name to write `path` (and files beside it) with local-only writers.

    `path` itself when local; for a bucket path, a name in a temporary folder whose
    files are uploaded beside `path` when the block ends without error.
    """
    if not is_remote(path):
        yield os.fspath(path)
        return
    with _uploaded_from_staging(epath.Path(path)) as staged:
        yield staged


@contextlib.contextmanager
def _uploaded_from_staging(target: epath.Path) -> Iterator[str]:
    """A local name for the bucket path `target`, in a temporary folder; when the block ends without
    error, each file written there is uploaded beside `target` (an upload appears whole or not at all)."""
    with tempfile.TemporaryDirectory(prefix="bioclip_jax_upload_") as staging:
        yield os.path.join(staging, target.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(staging)):
            epath.Path(staging, name).copy(target.parent / name, overwrite=True)
