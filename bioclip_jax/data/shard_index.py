"""Where each sample of a webdataset shard lies, from one scan of its tar headers.

Grain reads by random access, tar files only stream; so each shard's headers are
scanned once (no payload is read) and the byte range of every sample is kept
(`index_cache` stores it beside the shard or in a cache directory). Webdataset
stores a sample's members next to each other, so one range per sample (from its
first header to the end of its last payload) is all a reader needs: 16 bytes per
sample in memory, whatever the number of caption files.

A truncated or damaged tar is indexed up to its last complete member and flagged;
the sample at the cut is marked so that readers can count it instead of crashing.

Every path goes through `etils.epath`, so shards may be local or `gs://bucket/...`
(gcsfs). On TPU VMs shards can be read straight from gs:// or through a read-only
gcsfuse mount (plain local paths); both work unchanged (with a read-only mount,
point `data.index_cache_dir` somewhere writable).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile

import fsspec
import numpy as np
from etils import epath

from bioclip_jax.data.tar_headers import TarCut, members_of, padded
from bioclip_jax.paths import is_remote

INDEX_SUFFIX = ".idx.json"
INDEX_FORMAT = "bioclip_jax.shard_index"
INDEX_VERSION = 1


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
            end = padded(data_offset + data_size)
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


def unreadable(path: str, error: Exception, size: int = 0, mtime: float = 0.0) -> ShardIndex:
    """An index without samples that says why the shard could not be read."""
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
        return unreadable(path, error)
    return ShardIndex(path, size, mtime, np.asarray(starts, dtype=np.int64),
                      np.asarray(ends, dtype=np.int64), members, cut, cut_key)
