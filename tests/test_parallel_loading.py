"""Per-example loading in threads and worker processes: same batches whatever the workers, bounded buffers."""

from __future__ import annotations

import errno
import glob
import mmap
import os
import sys
import threading
import time
import types

import numpy as np
import pytest

from bioclip_jax.data import batching, pipeline
from bioclip_jax.data.tar_source import TarShardSource
from test_pipeline import assert_batches_equal, dataset, take
from test_shard_source import write_shards


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOCLIP_JAX_INDEX_CACHE", str(tmp_path / "index_cache"))


class CountingSource:
    """Raw samples held in memory; counts reads, and can make the first `rendezvous` reads wait for each other."""

    def __init__(self, samples: list[dict], rendezvous: int = 0):
        self.samples = samples
        self.reads = 0
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(rendezvous, timeout=20) if rendezvous else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        with self._lock:
            self.reads += 1
            first = self.reads <= (self._barrier.parties if self._barrier else 0)
        if first:
            self._barrier.wait()  # raises BrokenBarrierError if the reads are not concurrent
        return self.samples[int(index)]


def in_memory(tmp_path, count: int) -> list[dict]:
    source = TarShardSource(write_shards(tmp_path / "mem", count, 16))
    return [source[i] for i in range(len(source))]


def test_two_workers_small_chunks_give_the_one_process_batches(tmp_path):
    # 5 batches of 3 chunks of 2: the 15 chunks split unevenly over 2 workers, and chunks of a batch cross workers.
    shards = write_shards(tmp_path / "s", 30, 8)
    options = dict(global_batch_size=6, num_epochs=1, chunk_examples=2)
    expected = list(dataset(shards, **options))
    iterator = iter(dataset(shards, **options, worker_count=2))
    try:
        got = list(iterator)
    finally:
        iterator.close()
    assert len(expected) == 5
    assert_batches_equal(got, expected)
    np.testing.assert_array_equal(np.concatenate([b["position"] for b in got]), np.arange(30))


def test_state_saved_without_workers_resumes_with_workers(tmp_path):
    shards = write_shards(tmp_path / "s", 24, 8)
    iterator = iter(dataset(shards, text_type="random", chunk_examples=4))
    take(iterator, 2)
    state = iterator.get_state()
    assert state == {"next_index": 2}  # one counter: the form a plain Grain iterator saves
    expected = take(iterator, 3)
    resumed = iter(dataset(shards, text_type="random", chunk_examples=4, worker_count=2))
    try:
        resumed.set_state(state)
        assert_batches_equal(take(resumed, 3), expected)
    finally:
        resumed.close()


def mapped_block(array: np.ndarray):
    """The mmap an array's memory belongs to, or None (its own heap memory)."""
    base = array
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.base if isinstance(base, np.ndarray) else base.obj
    return base if isinstance(base, mmap.mmap) else None


def test_workers_write_images_straight_into_the_batch(tmp_path):
    # The main process once concatenated the workers' chunks (and Grain copied each chunk through its own
    # segment): ~150-250 us of its CPU per 224 px image, which capped a host at ~3k images/s.
    shards = write_shards(tmp_path / "s", 16, 8)
    options = dict(global_batch_size=8, chunk_examples=2)
    expected = take(iter(dataset(shards, **options)), 2)
    iterator = iter(dataset(shards, **options, worker_count=2))
    try:
        got = take(iterator, 2)
    finally:
        iterator.close()
    assert_batches_equal(got, expected)
    for batch in got:
        assert mapped_block(batch["image"]) is not None  # the block the workers wrote, mapped as it is
        assert batch["image"].flags.c_contiguous and batch["image"].shape == (8, 16, 16, 3)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="lists POSIX shared memory through /dev/shm (Linux)")
def test_closing_frees_the_blocks_of_batches_in_flight(tmp_path):
    shards = write_shards(tmp_path / "s", 64, 16)
    iterator = iter(dataset(shards, global_batch_size=8, chunk_examples=2, worker_count=2))
    next(iterator)
    blocks = f"/dev/shm/{iterator._blocks.name(0, 0)[1:].split('_')[0]}_*"
    deadline = time.monotonic() + 60
    while not glob.glob(blocks) and time.monotonic() < deadline:  # the workers run ahead into later batches
        time.sleep(0.1)
    assert glob.glob(blocks), "no batch blocks in flight: the workers do not write into shared memory"
    iterator.close()
    assert glob.glob(blocks) == []


def block_path(iterator, batch: int) -> str:
    return f"/dev/shm{iterator._blocks.name(batch, 0)}"


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="lists POSIX shared memory through /dev/shm (Linux)")
def test_workers_free_the_blocks_of_batches_the_loop_has_let_go(tmp_path):
    # Freeing a block's pages costs about what writing them does: the main process leaves it to the workers.
    shards = write_shards(tmp_path / "s", 96, 16)
    iterator = iter(dataset(shards, global_batch_size=8, chunk_examples=4, worker_count=2))
    try:
        first = next(iterator)
        assert os.path.exists(block_path(iterator, 0))  # taken, still named: the main process does not free it
        del first
        take(iterator, batching.TAKEN_BATCHES_KEPT + 2)
        deadline = time.monotonic() + 60
        while os.path.exists(block_path(iterator, 0)) and time.monotonic() < deadline:
            time.sleep(0.1)  # a worker unlinks it with its next chunk
        assert not os.path.exists(block_path(iterator, 0))
        assert os.path.exists(block_path(iterator, batching.TAKEN_BATCHES_KEPT + 2))  # the newest stay
    finally:
        iterator.close()


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="lists POSIX shared memory through /dev/shm (Linux)")
def test_a_finished_stream_leaves_no_blocks(tmp_path):
    shards = write_shards(tmp_path / "s", 48, 16)
    iterator = iter(dataset(shards, global_batch_size=8, num_epochs=1, chunk_examples=4, worker_count=2))
    assert len(list(iterator)) == 6  # no close(): the end of the stream frees what is left
    assert glob.glob(block_path(iterator, 0).rsplit("_", 2)[0] + "_*") == []


def test_full_shared_memory_is_a_clear_error(monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    blocks = batching._SharedBlocks(0, keep=4)
    monkeypatch.setattr(batching.os, "posix_fallocate", full, raising=False)
    with pytest.raises(OSError, match=r"enlarge /dev/shm \(docker: --shm-size\)"):
        blocks.write(0, 0, (4, 2), np.uint8, 0, [np.zeros(2, np.uint8)])
    blocks.discard(range(1), 1)


def wait_until_still(source: CountingSource, quiet_s: float = 1.0, limit_s: float = 30.0) -> int:
    """Reads once the loader's background threads have stopped reading (their buffers are full)."""
    deadline = time.monotonic() + limit_s
    seen = source.reads
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        if source.reads == seen:
            return seen
        seen = source.reads
    raise AssertionError("the loader kept reading: its buffers are not bounded")


def test_buffered_examples_are_bounded_not_whole_batches(tmp_path):
    source = CountingSource(in_memory(tmp_path, 48))
    batch, chunk, threads = 48, 4, 2
    iterator = iter(dataset(source, global_batch_size=batch, chunk_examples=chunk, read_threads=threads))
    next(iterator)
    bound = 2 * threads + (batching.WORKER_BUFFER_CHUNKS + 2) * chunk  # the bound batching promises
    assert wait_until_still(source) <= batch + bound < 2 * batch


def test_reads_of_one_batch_overlap_across_threads(tmp_path):
    source = CountingSource(in_memory(tmp_path, 8), rendezvous=2)  # the first two reads must be in flight together
    batches = list(dataset(source, global_batch_size=8, num_epochs=1, read_threads=2))
    assert len(batches) == 1 and not batches[0]["skipped"].any()


def test_worker_count_minus_one_is_sized_from_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(batching.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert batching.resolve_worker_count(-1) == 5
    monkeypatch.setattr(batching.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert batching.resolve_worker_count(-1) == 0
    assert batching.resolve_worker_count(3) == 3
    with pytest.raises(ValueError, match="data workers must be >= 0, or -1"):
        batching.resolve_worker_count(-2)


def test_chunks_tile_every_batch():
    assert [batching.chunk_size(b) for b in (8, 96, 32768, 97)] == [8, 48, 64, 1]
    for workers in (2, 3):
        order = [batching.worker_major(i, 2, workers) for i in range(12)]
        assert sorted(order) == list(range(12))
        assert order[:workers * 2:workers] == [0, 1]  # worker 0 reads chunk 0 first, whole


def test_tfds_sources_are_opened_by_the_tfds_module(monkeypatch):
    opened = []
    fake = types.ModuleType("bioclip_jax.data.tfds_source")
    fake.open_tfds_source = lambda name: opened.append(name) or ["sample"]
    monkeypatch.setitem(sys.modules, "bioclip_jax.data.tfds_source", fake)
    assert pipeline.open_sample_source("tfds:tree_of_life/10m:1.0.0") == ["sample"]
    assert opened == ["tree_of_life/10m:1.0.0"]
