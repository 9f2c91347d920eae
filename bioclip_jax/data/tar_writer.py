"""Writes webdataset tar shards (`shard-%06d.tar`) in the TreeOfLife-10M layout.

A sample is a key (e.g. a treeoflife_id) plus a dict of extensions to bytes
(`{"jpg": ..., "taxonomic_name.txt": ...}`); members are named `<key>.<ext>` and
the members of one sample are written next to each other, as webdataset expects.
Shards are written to a temporary name and renamed when complete, so a crash
never leaves a half-written shard under its final name.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from typing import Mapping

from bioclip_jax.paths import atomic_local_file

SHARD_NAME = "shard-{:06d}.tar"


class ShardWriter:
    """Splits samples into shards of `samples_per_shard` samples each."""

    def __init__(self, out_dir: str, samples_per_shard: int = 1000, start_index: int = 0):
        if samples_per_shard <= 0:
            raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.shard_index = start_index
        self.shard_paths: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._shard_file = contextlib.ExitStack()  # closing it puts the finished shard under its name
        self._in_shard = 0
        os.makedirs(out_dir, exist_ok=True)

    def write(self, key: str, files: Mapping[str, bytes]) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
        if self._tar is None:
            self._open()
        for ext, payload in files.items():
            info = tarfile.TarInfo(name=f"{key}.{ext}")
            info.size = len(payload)
            info.mtime = 0  # reproducible bytes for a given input
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(payload))
        self._in_shard += 1
        if self._in_shard >= self.samples_per_shard:
            self._close_shard()

    def close(self) -> list[str]:
        if self._tar is not None:
            self._close_shard()
        return self.shard_paths

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        final = os.path.join(self.out_dir, SHARD_NAME.format(self.shard_index))
        temporary = self._shard_file.enter_context(atomic_local_file(final))
        self._tar = tarfile.open(temporary, "w", format=tarfile.USTAR_FORMAT)
        self._in_shard = 0

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._shard_file.close()
        final = os.path.join(self.out_dir, SHARD_NAME.format(self.shard_index))
        self.shard_paths.append(final)
        self._tar = None
        self.shard_index += 1
