"""Embeddings of an archive run, in shards written whole, so that a killed `embed` resumes where it stopped.

`path` is a folder, or a `FILE.npy` (today's `embed --output` contract: FILE.npy [N, D] float32 and
FILE.keys.txt, one key per row). Each process keeps its rows in memory until it has `rows_per_shard`
of them, until `seconds_per_shard` passed since its last shard, or until it closes; then writes
`part-PPPPP-SSSSS.keys.txt` and `part-PPPPP-SSSSS.npy` (process, shard number), each at once, the
.npy last: a shard is there when its .npy is. So a kill -9 loses only the rows not yet in a shard,
and a rerun (the same `path`, the same identity) embeds exactly those again.

A folder holds its shards, `index.csv` (key, shard, row; written at the end), `skipped.csv` and
`run.json`. For FILE.npy the shards are staged in `FILE.npy.parts/`, and the end builds FILE.npy
(chunk by chunk into a memory map, renamed into place), then FILE.keys.txt, then removes the
parts; FILE.npy may hold more rows than FILE.keys.txt names (a crash between the two renames): the
rows past the keys are ignored and come again from the parts.
"""

from __future__ import annotations

import csv
import glob
import io
import logging
import os
import shutil
import time
from typing import Sequence

import numpy as np

from bioclip_jax.outputs.records import KEY_FIELD, AppendLog, concatenate, whole_keys
from bioclip_jax.outputs.rows import part_name, skipped_path
from bioclip_jax.outputs.run_record import OutputSummary, check_or_record, remove_if_empty, require_local
from bioclip_jax.paths import atomic_local_file, read_json, write_atomically

log = logging.getLogger(__name__)

_COPY_ROWS = 65536  # rows copied at a time into the final FILE.npy


class _Layout:
    """Where an embeddings output keeps each of its files."""

    def __init__(self, path: str):
        require_local(path)
        self.path = os.path.abspath(path)
        self.single_file = self.path.endswith(".npy")
        self.staging = self.path + ".parts" if self.single_file else self.path
        self.run_record = self.path + ".run.json" if self.single_file else os.path.join(self.path, "run.json")
        self.skipped = skipped_path(self.path) if self.single_file else os.path.join(self.path, "skipped.csv")
        self.final_keys = self.path[:-len(".npy")] + ".keys.txt"

    def shards(self) -> list[str]:
        """Shard names (`part-00001-00003`) whose .npy is written, in order."""
        found = glob.glob(os.path.join(glob.escape(self.staging), "part-*.npy"))
        return sorted(os.path.basename(name)[:-len(".npy")] for name in found)

    def skipped_parts(self) -> list[str]:
        return sorted(glob.glob(os.path.join(glob.escape(self.staging), "process-*.skipped.csv")))

    def exists(self) -> bool:
        return any(os.path.exists(p) for p in (self.path, self.staging, self.skipped, self.final_keys)) if \
            self.single_file else bool(self.shards() or os.path.exists(self.skipped) or self.skipped_parts())


def _rows_of(npy: str) -> tuple[int, ...]:
    return np.load(npy, mmap_mode="r").shape


def _read_keys(keys_file: str) -> list[str]:
    with open(keys_file, encoding="utf-8", newline="\n") as handle:
        return handle.read().split("\n")[:-1]


def _shard_keys(layout: _Layout, shard: str) -> list[str]:
    base = os.path.join(layout.staging, shard)
    if not os.path.exists(base + ".keys.txt"):
        raise ValueError(f"{base}.npy has no {shard}.keys.txt beside it; remove the shard to embed its rows again")
    keys = _read_keys(base + ".keys.txt")
    if len(keys) != _rows_of(base + ".npy")[0]:
        raise ValueError(f"{base}.keys.txt names {len(keys)} rows but {shard}.npy holds {_rows_of(base + '.npy')[0]}; "
                         f"remove both to embed their rows again")
    return keys


def _final_keys(layout: _Layout) -> list[str]:
    """The keys of a built FILE.npy: those FILE.keys.txt names (its first rows)."""
    if not (layout.single_file and os.path.exists(layout.path) and os.path.exists(layout.final_keys)):
        return []
    keys = _read_keys(layout.final_keys)
    if len(keys) > _rows_of(layout.path)[0]:
        raise ValueError(f"{layout.final_keys} names {len(keys)} rows but {layout.path} holds only "
                         f"{_rows_of(layout.path)[0]}; remove both to start over")
    return keys


class EmbeddingShards:
    """Where one process writes an archive run's embeddings and skipped inputs; see the module docstring."""

    def __init__(self, path: str, dim: int, identity: dict, *, rows_per_shard: int = 65536,
                 seconds_per_shard: float = 60.0, process_index: int = 0, process_count: int = 1):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be at least 1, got {rows_per_shard}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process {process_index} of {process_count} does not exist")
        self.layout = _Layout(path)
        self.dim, self.rows_per_shard, self.seconds_per_shard = dim, rows_per_shard, seconds_per_shard
        self.process_index, self.process_count = process_index, process_count
        check_or_record(self.layout.run_record, {**identity, "dim": dim}, self.layout.path, self.layout.exists())
        os.makedirs(self.layout.staging, exist_ok=True)
        skipped_file = self.layout.skipped if process_count == 1 else os.path.join(
            self.layout.staging, f"{part_name(process_index, process_count)}.skipped.csv")
        self._skipped = AppendLog(skipped_file, "csv")  # also the lock that keeps a second run out

        self.done = set(_final_keys(self.layout)) | set(self._skipped.keys)
        own_prefix = f"part-{process_index:05d}-"
        self._next_shard = 0
        for shard in self.layout.shards():
            self.done.update(_shard_keys(self.layout, shard))
            if shard.startswith(own_prefix):
                self._next_shard = max(self._next_shard, int(shard[len(own_prefix):]) + 1)
        for skipped in [self.layout.skipped] + self.layout.skipped_parts():
            if skipped != self._skipped.path:
                self.done.update(whole_keys(skipped, "csv"))
        self.summary = OutputSummary(already_done=len(self.done))
        self._keys: list[str] = []
        self._chunks: list[np.ndarray] = []
        self._last_shard = time.monotonic()

    def write(self, keys: Sequence[str], features: np.ndarray) -> None:
        """Keeps these rows for the next shard; keys already done are left out."""
        features = np.asarray(features, dtype=np.float32)
        if features.shape != (len(keys), self.dim):
            raise ValueError(f"{len(keys)} keys need features of shape ({len(keys)}, {self.dim}) for "
                             f"{self.layout.path}, got {features.shape}")
        for key in keys:
            if "\n" in key:
                raise ValueError(f"key {key!r} holds a line break, which {self.layout.path}'s keys files cannot")
        fresh = [i for i, key in enumerate(keys) if key not in self.done]
        if len(fresh) < len(keys):
            log.warning("%d inputs were embedded by an earlier run already; their rows are left out",
                        len(keys) - len(fresh))
        self._keys += [keys[i] for i in fresh]
        self._chunks.append(features[fresh])
        self.summary.answered += len(fresh)
        while len(self._keys) >= self.rows_per_shard:
            self._write_shard(self.rows_per_shard)
        if self._keys and time.monotonic() - self._last_shard >= self.seconds_per_shard:
            self._write_shard(len(self._keys))

    def _write_shard(self, rows: int) -> None:
        buffered = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        keys, self._keys = self._keys[:rows], self._keys[rows:]
        self._chunks = [buffered[rows:]]
        base = os.path.join(self.layout.staging, f"part-{self.process_index:05d}-{self._next_shard:05d}")
        write_atomically(base + ".keys.txt", "".join(key + "\n" for key in keys))
        with atomic_local_file(base + ".npy") as temporary, open(temporary, "wb") as handle:
            np.save(handle, buffered[:rows])
            handle.flush()
            os.fsync(handle.fileno())
        self._next_shard += 1
        self._last_shard = time.monotonic()

    def skip(self, key: str, reason: str) -> None:
        """Records an input that could not be embedded (unreadable, say), and why; it counts as done."""
        self._skipped.append([{KEY_FIELD: key, "reason": reason}])
        self.summary.skipped += 1

    def close(self) -> None:
        """Writes the last shard; a single process also builds the index or FILE.npy (merge_embedding_parts)."""
        if self._keys:
            self._write_shard(len(self._keys))
        self._skipped.close()
        if self.process_count == 1:
            merge_embedding_parts(self.layout.path)


def merge_embedding_parts(path: str) -> None:
    """Process 0, after every process closed: `index.csv` for a folder, FILE.npy and FILE.keys.txt for a .npy,
    and one skipped file. A key in two places (a merge cut short, then run again) is taken once, first wins."""
    layout = _Layout(path)
    if not os.path.exists(layout.run_record):
        return  # no run wrote here
    dim = read_json(layout.run_record)["dim"]
    skipped_parts = layout.skipped_parts()
    if skipped_parts:
        concatenate([layout.skipped] + skipped_parts, layout.skipped, "csv")
    for orphan in glob.glob(os.path.join(glob.escape(layout.staging), "part-*.keys.txt")):
        if not os.path.exists(orphan[:-len(".keys.txt")] + ".npy"):
            os.remove(orphan)  # a shard a crash left half written: its rows were embedded again
    if layout.single_file:
        if os.path.isdir(layout.staging) or not os.path.exists(layout.path):
            _build_single_file(layout, dim)
        shutil.rmtree(layout.staging, ignore_errors=True)
    else:
        _write_index(layout)
        for part in skipped_parts:
            os.remove(part)
    remove_if_empty(layout.skipped)


def _write_index(layout: _Layout) -> None:
    seen: set[str] = set()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["key", "shard", "row"])
    for shard in layout.shards():
        for row, key in enumerate(_shard_keys(layout, shard)):
            if key not in seen:
                seen.add(key)
                writer.writerow([key, shard + ".npy", row])
    write_atomically(os.path.join(layout.path, "index.csv"), text.getvalue())


def _build_single_file(layout: _Layout, dim: int) -> None:
    """FILE.npy from its earlier rows and the shards, renamed into place before FILE.keys.txt (see module)."""
    sources = [(layout.path, _final_keys(layout))] if os.path.exists(layout.path) else []
    sources += [(os.path.join(layout.staging, shard + ".npy"), _shard_keys(layout, shard))
                for shard in layout.shards()]
    seen: set[str] = set()
    kept = []
    for _, keys in sources:
        mask = np.zeros(len(keys), dtype=bool)
        for i, key in enumerate(keys):
            if key not in seen:
                seen.add(key)
                mask[i] = True
        kept.append(mask)
    total = sum(int(mask.sum()) for mask in kept)
    with atomic_local_file(layout.final_keys) as keys_temporary:
        with atomic_local_file(layout.path) as temporary:
            out = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=(total, dim))
            filled = 0
            with open(keys_temporary, "w", encoding="utf-8", newline="\n") as keys_out:
                for (npy, keys), mask in zip(sources, kept):
                    rows = np.load(npy, mmap_mode="r")
                    for start in range(0, len(keys), _COPY_ROWS):
                        block = np.asarray(rows[start:start + _COPY_ROWS])[mask[start:start + _COPY_ROWS]]
                        out[filled:filled + len(block)] = block
                        filled += len(block)
                    keys_out.writelines(key + "\n" for key, keep in zip(keys, mask) if keep)
                    del rows
            out.flush()
            del out
