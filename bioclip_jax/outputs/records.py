"""Append-only files of records (csv or jsonl) that survive a kill -9 at any byte.

The contract every writer here keeps: the records of one key are contiguous, and a key's records
go out in one append. So whatever a crash leaves, only the tail can be unfinished: a partial
line, or the first few of a key's `rows_per_key` records. Readers take whole keys only; the one
process that appends to a file cuts its unfinished tail off before appending again.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import io
import json
import logging
import os
import time
from typing import BinaryIO, Iterable, Iterator, NamedTuple

from bioclip_jax.paths import atomic_local_file

log = logging.getLogger(__name__)

KEY_FIELD = "file_name"
LINE_FORMATS = ("csv", "jsonl")
FSYNC_EVERY_S = 5.0  # a power cut may lose the last seconds of rows, never leave a damaged file


class WholeKey(NamedTuple):
    key: str
    raw: bytes  # the key's records exactly as they are in the file
    end: int  # byte offset just past them


class Scan:
    """Reads a file's whole keys in order; afterwards `header` (csv) and `end` (bytes that hold them) are set."""

    def __init__(self, handle: BinaryIO, fmt: str, rows_per_key: int, where: str):
        self.handle, self.fmt, self.rows_per_key, self.where = handle, fmt, rows_per_key, where
        self.header: list[str] | None = None
        self.end = 0

    def _records(self) -> Iterator[tuple[str, bytes, int]]:
        """(key, raw bytes, end offset) of each whole record; stops at the first unfinished one."""
        consumed: list[bytes] = []

        def whole_lines() -> Iterator[str]:
            for raw in self.handle:
                if not raw.endswith(b"\n"):
                    return  # a line a crash cut short
                consumed.append(raw)
                yield raw.decode("utf-8")

        offset = 0
        try:
            if self.fmt == "jsonl":
                for line in whole_lines():
                    record = json.loads(line)
                    offset += len(consumed[0])
                    yield str(record[KEY_FIELD]), consumed.pop(), offset
                return
            for fields in csv.reader(whole_lines(), strict=True):
                raw = b"".join(consumed)
                consumed.clear()
                offset += len(raw)
                if self.header is None:
                    if KEY_FIELD not in fields:
                        raise ValueError(f"{self.where} has no {KEY_FIELD} column")
                    self.header, self.end = fields, offset
                    continue
                if len(fields) != len(self.header):
                    return
                yield fields[self.header.index(KEY_FIELD)], raw, offset
        except (csv.Error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return

    def __iter__(self) -> Iterator[WholeKey]:
        key, raws, group_end = None, [], 0
        for record_key, raw, end in self._records():
            if record_key != key:
                if key is not None and len(raws) >= self.rows_per_key:
                    self.end = group_end
                    yield WholeKey(key, b"".join(raws), group_end)
                key, raws = record_key, []
            raws.append(raw)
            group_end = end
        if key is not None and len(raws) >= self.rows_per_key:
            self.end = group_end
            yield WholeKey(key, b"".join(raws), group_end)


def whole_keys(path: str, fmt: str, rows_per_key: int = 1) -> list[str]:
    """The keys whose records are all in `path` (none when it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as handle:
        return [whole.key for whole in Scan(handle, fmt, rows_per_key, path)]


def _csv_text(fieldnames: list[str], rows: Iterable[dict], header: bool) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fieldnames, lineterminator="\n", extrasaction="raise")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


@contextlib.contextmanager
def locked(path: str, mode: str = "a+b") -> Iterator[BinaryIO]:
    """`path` open, under an exclusive lock: a second run writing the same output is refused, not interleaved.
    Where the file system has no locks (some FUSE mounts) it goes ahead unlocked."""
    handle = open(path, mode)  # closed below
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ValueError(f"{path} is being written by another run; wait for it to end or choose "
                                 f"another --output") from None
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
        yield handle
    finally:
        handle.close()


class AppendLog:
    """One process's append-only csv or jsonl file: reopened, its unfinished tail is cut off, then rows are
    appended as whole keys, each `append` one write and one flush, fsync'd at most every FSYNC_EVERY_S."""

    def __init__(self, path: str, fmt: str, rows_per_key: int = 1):
        if fmt not in LINE_FORMATS:
            raise ValueError(f"{path}: an append log is csv or jsonl, not {fmt}")
        self.path, self.fmt, self.rows_per_key = path, fmt, rows_per_key
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._lock = locked(path)
        self.handle = self._lock.__enter__()
        self.handle.seek(0)
        scan = Scan(self.handle, fmt, rows_per_key, path)
        self.keys = [whole.key for whole in scan]
        self.header = scan.header if self.keys else None
        size = os.fstat(self.handle.fileno()).st_size
        end = scan.end if self.keys else 0
        if end < size:
            log.warning("%s: cut off %d bytes an interrupted run left unfinished at its end; their images "
                        "will be answered again", path, size - end)
            self.handle.truncate(end)
        self.handle.seek(0, os.SEEK_END)
        self._synced = time.monotonic()

    def append(self, rows: list[dict]) -> None:
        if not rows:
            return
        if self.fmt == "jsonl":
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        else:
            new_file = self.header is None
            if new_file:
                self.header = list(rows[0])
            columns = set(self.header)
            for row in rows:
                if set(row) != columns:
                    raise ValueError(f"a row for {row.get(KEY_FIELD)} has columns {sorted(row)}, but {self.path} "
                                     f"has {self.header}")
            text = _csv_text(self.header, rows, header=new_file)
        self.handle.write(text.encode("utf-8"))
        self.handle.flush()
        if time.monotonic() - self._synced >= FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if self.handle.closed:
            return
        self.sync()
        self._lock.__exit__(None, None, None)


def concatenate(sources: list[str], target: str, fmt: str, rows_per_key: int = 1) -> int:
    """Writes the whole keys of `sources`, in order, to `target` at once (csv header once); a key already
    written from an earlier source is left out (a merge a crash cut short, then run again). Returns keys."""
    seen: set[str] = set()
    header = None
    with atomic_local_file(target) as temporary, open(temporary, "wb") as out:
        for source in sources:
            if not os.path.exists(source):
                continue
            with locked(source, "rb") as handle:
                scan = Scan(handle, fmt, rows_per_key, source)
                for whole in scan:
                    if fmt == "csv" and header is None:
                        header = scan.header
                        out.write(_csv_text(header, [], header=True).encode("utf-8"))
                    elif fmt == "csv" and scan.header != header:
                        raise ValueError(f"{source} has columns {scan.header}, but {sources[0]} has {header}; "
                                         f"they cannot be merged into {target}")
                    if whole.key not in seen:
                        seen.add(whole.key)
                        out.write(whole.raw)
        out.flush()
        os.fsync(out.fileno())
    return len(seen)
