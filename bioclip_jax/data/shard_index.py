"""Finds webdataset shards from an open_clip-style pattern and indexes where each sample lies.

Grain reads by random access, tar files only stream; so each shard's headers are
scanned once (no payload is read) and the byte range of every sample is cached
beside the shard (`shard-000000.tar.idx.json`) or, where the data directory is
read-only, under a cache directory keyed by the shard's path, size and mtime.
Webdataset stores a sample's members next to each other, so one range per sample
(from its first header to the end of its last payload) is all a reader needs:
16 bytes per sample in memory, whatever the number of caption files.

A truncated or damaged tar is indexed up to its last complete member and flagged;
the sample at the cut is marked so that readers can count it instead of crashing.

Every path goes through `etils.epath`, so shards, patterns and the index cache may
be local or `gs://bucket/...` (gcsfs). On TPU VMs shards can be read straight from
gs:// or through a read-only gcsfuse mount (plain local paths); both work unchanged
(with a read-only mount, point `data.index_cache_dir` somewhere writable).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
from typing import Sequence

import fsspec
import numpy as np
from etils import epath

from bioclip_jax.paths import is_remote, write_atomically

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "bioclip_jax.shard_index"
INDEX_VERSION = 1
CACHE_DIR_ENV = "BIOCLIP_JAX_INDEX_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/bioclip_jax/shard_index"
SHARD_EXTENSIONS = (".tar", ".array_record")

_BLOCK = 512
_GLOB_CHARS = re.compile(r"[*?\[]")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


class ShardNotFoundError(FileNotFoundError):
    """A shard (or the files a pattern should match) does not exist."""


# ----------------------------------------------------------------------------- paths


def expand_user(path: str | os.PathLike) -> str:
    """A user-given path as text, `~` expanded for local paths only."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.expanduser(text)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An epath for a user-given path: local or `gs://bucket/...`."""
    return epath.Path(expand_user(path))


def open_text(path: str | os.PathLike) -> io.TextIOWrapper:
    """A UTF-8 text file on any filesystem, newlines left as they are (what the csv module wants)."""
    return io.TextIOWrapper(as_path(path).open("rb"), encoding="utf-8", newline="")


# ----------------------------------------------------------------------------- patterns


def _matching_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `{` at `start`, or -1."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level_commas(body: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += char == "{"
        depth -= char == "}"
        current.append(char)
    parts.append("".join(current))
    return parts


def _range_items(match: re.Match) -> list[str]:
    """`000..159` keeps the zero padding of its ends, as braceexpand (and so open_clip) does."""
    first, last, step = match.group(1), match.group(2), match.group(3)
    lo, hi = int(first), int(last)
    stride = abs(int(step)) if step else 1
    if stride == 0:
        raise ValueError(f"brace range {match.group(0)!r} has a zero step")
    numbers = range(lo, hi + 1, stride) if lo <= hi else range(lo, hi - 1, -stride)
    padded = any(len(t.lstrip("-")) > 1 and t.lstrip("-").startswith("0") for t in (first, last))
    width = max(len(first), len(last)) if padded else 0
    return [str(n).zfill(width) for n in numbers]


def expand_braces(pattern: str) -> list[str]:
    """`a{0..2}b` -> a0b a1b a2b; `{x,y}` -> x y; nested braces expand inside out."""
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end == -1:
            raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
        body = pattern[start + 1 : end]
        match = _RANGE.match(body)
        alternatives = _split_top_level_commas(body)
        if match or len(alternatives) > 1:
            items = _range_items(match) if match else alternatives
            prefix, suffixes = pattern[:start], expand_braces(pattern[end + 1 :])
            return [prefix + head + tail for item in items for head in expand_braces(item) for tail in suffixes]
        start = pattern.find("{", end + 1)  # `{x}` alone is literal, like in bash
    return [pattern]


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


# ----------------------------------------------------------------------------- index


@dataclasses.dataclass
class ShardIndex:
    """Where the samples of one shard lie: sample i is bytes [starts[i], ends[i]).

    `truncated_sample` is the position of the sample at a truncation cut (-1 if the
    shard ends cleanly); `problem` says why a shard could not be indexed at all.
    """

    path: str
    size: int
    mtime: float
    starts: np.ndarray
    ends: np.ndarray
    num_members: int = 0
    truncated_sample: int = -1
    truncated_key: str | None = None
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def truncated(self) -> bool:
        return self.truncated_sample >= 0

    def to_json(self) -> str:
        return json.dumps({
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "shard": self.path,
            "size": self.size, "mtime": self.mtime, "num_members": self.num_members,
            "truncated_sample": self.truncated_sample, "truncated_key": self.truncated_key,
            "starts": self.starts.tolist(), "ends": self.ends.tolist(),
        })

    @classmethod
    def from_json(cls, text: str, path: str) -> "ShardIndex":
        data = json.loads(text)
        if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
            raise ValueError("not a bioclip_jax shard index of this version")
        return cls(
            path=path, size=int(data["size"]), mtime=float(data["mtime"]),
            starts=np.asarray(data["starts"], dtype=np.int64), ends=np.asarray(data["ends"], dtype=np.int64),
            num_members=int(data["num_members"]), truncated_sample=int(data["truncated_sample"]),
            truncated_key=data["truncated_key"],
        )


def split_member_name(name: str) -> tuple[str, str] | None:
    """Webdataset naming: key = name up to the first dot of the basename, extension = the rest."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash or dot == len(name) - 1:
        return None
    return name[:dot], name[dot + 1 :]


def _padded(offset: int) -> int:
    return -(-offset // _BLOCK) * _BLOCK


class _NotPlain(Exception):
    """A header the fast reader leaves to tarfile (long names, pax, bad checksum, ...)."""


class TarCut(tarfile.ReadError):
    """The archive stops without its all-zero end block: truncated or damaged."""


# (header offset, member name, payload offset, payload size, is a regular file)
Member = tuple[int, str, int, int, bool]
_PLAIN_TYPES = {b"0": True, b"\0": True, b"5": False}  # regular file (two spellings), directory


def _plain_header(header: bytes, offset: int) -> Member:
    """Decodes a plain ustar header: a few slices instead of tarfile's general machinery."""
    is_file = _PLAIN_TYPES.get(header[156:157])
    if is_file is None or header[257:262] != b"ustar" or header[124] & 0x80:
        raise _NotPlain
    try:
        size = int(header[124:136].strip(b" \0") or b"0", 8)
        checksum = int(header[148:156].strip(b" \0"), 8)
    except ValueError:
        raise _NotPlain from None
    if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
        raise _NotPlain
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    name = (prefix + b"/" + name if prefix else name).decode("utf-8", errors="surrogateescape")
    return offset, name, offset + _BLOCK, size, is_file


def plain_members(fileobj, end: int, expect_end_block: bool = True):
    """Members of a tar made of plain ustar headers (raises _NotPlain at any other kind)."""
    offset = 0
    while offset < end:
        fileobj.seek(offset)
        header = fileobj.read(_BLOCK)
        if len(header) < _BLOCK:
            raise TarCut
        if not header.strip(b"\0"):
            return
        member = _plain_header(header, offset)
        yield member
        offset = member[2] + _padded(member[3])
    if expect_end_block:
        raise TarCut


def tarfile_members(fileobj, expect_end_block: bool = True):
    """Members of any tar that tarfile reads; headers only, payloads are skipped."""
    archive = tarfile.open(fileobj=fileobj, mode="r:")
    while True:
        try:
            info = archive.next()
        except (tarfile.ReadError, EOFError):
            raise TarCut from None  # header or payload past the end of the file
        if info is None:
            fileobj.seek(archive.offset)
            block = fileobj.read(_BLOCK)
            if not expect_end_block or (len(block) == _BLOCK and not block.strip(b"\0")):
                return
            raise TarCut
        archive.members.clear()  # headers only; do not keep 600k TarInfos of a 3 GB shard
        yield info.offset, info.name, info.offset_data, info.size, info.isfile()


def members_of(fileobj, end: int, expect_end_block: bool = True, consume=list):
    """`consume(member iterator)`, by the fast reader where it can, else by tarfile from the start."""
    try:
        return consume(plain_members(fileobj, end, expect_end_block))
    except _NotPlain:
        fileobj.seek(0)
        return consume(tarfile_members(fileobj, expect_end_block))


def _group_samples(members, size: int) -> tuple[list[int], list[int], int, int, str | None]:
    """Consecutive members with one key -> a sample; returns (starts, ends, members, cut sample, its key)."""
    starts: list[int] = []
    ends: list[int] = []
    count = 0
    current_key = None
    try:
        for header_offset, name, data_offset, data_size, is_file in members:
            split = split_member_name(name) if is_file else None
            if split is None:
                continue
            key = split[0]
            if data_offset + data_size > size:
                if key != current_key:
                    starts.append(header_offset)
                    ends.append(size)
                    current_key = key
                return starts, ends, count, len(starts) - 1, current_key
            count += 1
            end = _padded(data_offset + data_size)
            if key == current_key:
                ends[-1] = end
            else:
                starts.append(header_offset)
                ends.append(end)
                current_key = key
    except TarCut:
        if not starts:
            raise tarfile.ReadError("no complete member before the file ends") from None
        return starts, ends, count, len(starts) - 1, current_key
    return starts, ends, count, -1, None


def shard_stat(path: str) -> tuple[int, float]:
    """(size, mtime); local files give sub-second mtimes, so a quick rewrite is still noticed."""
    if not is_remote(path):
        stat = os.stat(path)
        return stat.st_size, stat.st_mtime
    stat = epath.Path(path).stat()
    return int(stat.length), float(stat.mtime)


def _unreadable(path: str, error: Exception, size: int = 0, mtime: float = 0.0) -> ShardIndex:
    empty = np.zeros(0, dtype=np.int64)
    return ShardIndex(path, size, mtime, empty, empty, problem=f"cannot read {path} as a tar file: {error}")


def open_for_scan(path: str):
    """Unbuffered for local files, so that skipping a payload reads none of its bytes."""
    return open(path, "rb", buffering=0) if not is_remote(path) else epath.Path(path).open("rb")


def open_for_reads(path: str):
    """A handle for many small reads at random offsets (one per sample).

    Remote files are opened through fsspec (the filesystem epath itself uses for gs://)
    without read-ahead: epath's open() takes no options, and gcsfs's default would fetch
    megabytes behind every ~30 KB sample. One read is then exactly one ranged GET.
    """
    if not is_remote(path):
        return epath.Path(path).open("rb")
    filesystem, remote_path = fsspec.core.url_to_fs(path)
    return filesystem.open(remote_path, "rb", cache_type="none")


def build_shard_index(path: str) -> ShardIndex:
    """Scans one shard's tar headers (payloads are skipped, not read)."""
    try:
        size, mtime = shard_stat(path)
        with open_for_scan(path) as fileobj:
            starts, ends, members, cut, cut_key = members_of(
                fileobj, size, consume=lambda found: _group_samples(found, size))
    except (OSError, tarfile.TarError) as error:
        return _unreadable(path, error)
    return ShardIndex(path, size, mtime, np.asarray(starts, dtype=np.int64),
                      np.asarray(ends, dtype=np.int64), members, cut, cut_key)


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
    except Exception:  # missing, unreadable or foreign: a cache miss (gfile raises non-OSError types)
        return None
    return index if (index.size, index.mtime) == (size, mtime) else None


def load_or_build_index(path: str, cache_dir: str | None = None) -> ShardIndex:
    """The cached index if still valid (same size and mtime), else a fresh scan, cached."""
    try:
        size, mtime = shard_stat(path)
    except OSError as error:
        return _unreadable(path, error)
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
            except Exception:  # read-only data directory (any filesystem's error): try the cache dir
                continue
    return index


def index_shards(paths: Sequence[str], cache_dir: str | None = None, num_threads: int = 8) -> list[ShardIndex]:
    """Indexes of all shards, scanned in parallel (I/O bound) where not cached."""
    if len(paths) <= 1 or num_threads <= 1:
        return [load_or_build_index(p, cache_dir) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(num_threads, len(paths))) as pool:
        return list(pool.map(lambda p: load_or_build_index(p, cache_dir), paths))
