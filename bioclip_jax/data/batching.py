"""Host batches from a per-example function, made by threads and worker processes, resumable by one counter.

    examples (k -> the k-th example of this host) -> worker-major order -> ReadOptions threads
      -> chunks of C examples (in each worker) -> mp_prefetch(W workers) -> C-chunks joined into batches

Each example is made on its own (read, decode, crop, tokenise), so on a network
filesystem up to `read_threads` reads wait at once in every worker, and a worker
only ever holds a few chunks, never a whole batch. Grain hands worker w the
elements w, w+W, w+2W, ... of the dataset before `to_iter_dataset`; ordering
the examples "worker-major" (see `worker_major`) makes those elements exactly the
chunks w, w+W, ..., which Grain's round-robin interleave then returns in order.
So a batch holds the same examples whatever W is (including no workers).

The large arrays (`direct_keys`: the images) never pass through the main process
as chunks: each worker writes its chunk's rows straight into the batch's own
shared-memory block (one per batch, named by the pipeline and the batch number,
created by whichever worker gets there first), and the main process maps the
finished block as the batch's array. Joining chunks by copying (fresh pages
zeroed, a copy, Grain's segment per chunk array mapped and freed) made the main
process the ceiling of a host, whatever the workers (figures in benchmarks/README.md).
Freeing a block's pages is left to the workers too (`_SharedBlocks`). Only the small
arrays (tokens, counters) are stacked and pickled through Grain's queues.

The iterator state is one counter, `{"next_index": batches taken}` (the same form
a plain Grain iterator saves), and restoring it rebuilds the pipeline from that
batch: a run resumes exactly, also with another worker count.

Memory bound per worker (or per main process, with no workers): at most
`2 * read_threads` examples in its threads, the chunk being written and
`WORKER_BUFFER_CHUNKS` chunks waiting for the main process, so about
2 * read_threads + (WORKER_BUFFER_CHUNKS + 2) * C examples, with
C <= MAX_CHUNK_EXAMPLES. At 224 px (150 KB an example) and the defaults (8 threads,
C = 64, 2 chunks) that is 272 examples, about 41 MB, whatever the batch size (before:
two whole local batches: 4.9 GB for 32,768 examples). The written rows of the
batches in flight live in shared memory (/dev/shm on Linux): the chunks the
workers have finished but the main process has not yet taken, plus the last
TAKEN_BATCHES_KEPT batches taken (or more, while the training loop holds them).
"""

from __future__ import annotations

import mmap
import os
import sys
import uuid
from multiprocessing import resource_tracker
from typing import Any, Callable

import grain
import numpy as np
from absl import flags

try:
    import _posixshmem  # CPython's POSIX shared-memory calls (what multiprocessing.shared_memory uses)
except ImportError:  # Windows: no POSIX shared memory; batches are joined in the main process instead
    _posixshmem = None

MAX_CHUNK_EXAMPLES = 64
WORKER_BUFFER_CHUNKS = 2
MAIN_PROCESS_CORES = 1  # the training loop's own thread: dispatch, host-to-device copies, batch assembly
# Arrays below this size go through Grain's queues pickled (a few KB of tokens per chunk); by default Grain
# gives every array of every chunk its own shared-memory segment, each created, mapped and freed.
PICKLED_BELOW_BYTES = 1 << 20
_BLOCK_PREFIX = "bcj"  # shared-memory names: bcj<pipeline token>_<batch>_<key index>, under 31 characters
# Batches the training loop may still hold after taking them (the one in the step and those prefetched
# onto the devices): their blocks keep their names, so their pages are freed by a worker, not by the
# main process, once the loop drops them.
TAKEN_BATCHES_KEPT = 4
_TRACKER_TYPE = "shared_memory"  # the resource tracker unlinks what a killed run leaves behind


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what Slurm or taskset granted, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def resolve_worker_count(workers: int) -> int:
    """`workers` as given, or for -1 one worker process per usable CPU beyond the main process's own.

    On 2 CPUs that is 1: the worker decodes on one core while the main process feeds
    the step from the other (with 0, the decoding threads would share the main process's
    interpreter lock with the training loop).
    """
    if workers == -1:
        return max(0, usable_cpus() - MAIN_PROCESS_CORES)
    if workers < 0:
        raise ValueError(f"data workers must be >= 0, or -1 to size them from the CPUs, got {workers}")
    return workers


def chunk_size(local_batch: int, limit: int = MAX_CHUNK_EXAMPLES) -> int:
    """The largest divisor of `local_batch` that is at most `limit`: chunks tile every batch exactly."""
    return max(d for d in range(1, min(local_batch, max(1, limit)) + 1) if local_batch % d == 0)


def worker_major(index: int, chunk: int, workers: int) -> int:
    """The example at element `index` of the worker-major order.

    Worker w reads elements w, w+W, w+2W, ...; its j-th element is example
    (w + W * (j // C)) * C + j % C, so its elements are the chunks w, w+W, ... in order.
    """
    if workers <= 1:
        return index
    worker, j = index % workers, index // workers
    return (worker + workers * (j // chunk)) * chunk + j % chunk


class _WorkerMajorExamples:
    """MapDataset.map transform: element index -> (k, example k) for the k worker-major order puts there
    (None past the end); k counts from the pipeline's first batch."""

    def __init__(self, make_example: Callable[[int], dict], first: int, count: int | None, chunk: int, workers: int):
        self.make_example, self.first, self.count = make_example, first, count
        self.chunk, self.workers = chunk, workers

    def __call__(self, index: int) -> dict | None:
        example = worker_major(int(index), self.chunk, self.workers)
        if self.count is not None and example >= self.count:
            return None  # pads the last round of chunks; Grain drops Nones
        return example, self.make_example(self.first + example)


# ----------------------------------------------------------------------------- batch blocks


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def _write_rows(target: np.ndarray, offset: int, rows: list[np.ndarray]) -> None:
    for i, row in enumerate(rows):
        target[offset + i] = row


def _reserve(fd: int, size: int) -> None:
    """Sizes a block, allocating its pages where the OS can: a full /dev/shm is then a clear error
    here, not a SIGBUS at the first write. Every worker of the batch calls it; after the first it
    changes nothing."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        elif os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
    except OSError as error:
        raise OSError(error.errno, f"cannot reserve {size / 2**20:.0f} MiB of shared memory for a batch "
                                   f"({error.strerror}): enlarge /dev/shm (docker: --shm-size) or lower the "
                                   f"batch size per host or the data workers") from None


class _LocalBlocks:
    """Batch arrays in this process's memory (no worker processes): chunks are written into them in place."""

    def __init__(self):
        self._open: dict[tuple[int, int], np.ndarray] = {}

    def write(self, batch: int, key: int, shape: tuple[int, ...], dtype: np.dtype, offset: int,
              rows: list[np.ndarray]) -> None:
        if (batch, key) not in self._open:
            self._open[batch, key] = np.empty(shape, dtype)
        _write_rows(self._open[batch, key], offset, rows)

    def take(self, batch: int, key: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self._open.pop((batch, key))

    def discard(self, batches: range, keys: int) -> None:
        self._open.clear()


class _SharedBlocks:
    """Batch arrays in POSIX shared memory, one block per (batch, key), written by the worker processes.

    A worker opens the block of its chunk's batch, creating it if it is the first
    (creating and sizing are idempotent, so workers may race), and writes its rows.
    The main process maps a block once every chunk of its batch has arrived and
    publishes how many batches it has taken. The workers unlink the names of the
    blocks taken more than `keep` batches ago, so freeing their pages (as costly as
    writing them) is the workers' work: the main process only drops its mapping
    when the training loop lets go of a batch (had it unlinked the name, freeing
    would fall to it). The creator of each block registers its name with
    multiprocessing's resource tracker, so a run killed with blocks still named
    does not leave them in /dev/shm.
    """

    def __init__(self, first: int, keep: int):
        self.token = uuid.uuid4().hex[:10]
        self.keep = keep  # batches the training loop may still hold: their names stay
        self._reaped = first  # in each worker: blocks before this batch are unlinked
        self._progress: np.ndarray | None = None  # int64 [1]: batches the main process has taken
        self._taken(create=True)  # here, in the main process, before any worker looks for it

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_progress": None}  # each process maps the counter itself

    def name(self, batch: int, key: int) -> str:
        return f"/{_BLOCK_PREFIX}{self.token}_{batch:x}_{key}"

    def _map(self, name: str, size: int, create: bool) -> mmap.mmap:
        created = False
        if create:
            try:
                fd = _posixshmem.shm_open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
                created = True
            except FileExistsError:
                fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        else:
            fd = _posixshmem.shm_open(name, os.O_RDWR, mode=0o600)
        try:
            if created:
                resource_tracker.register(name, _TRACKER_TYPE)
            if create:
                _reserve(fd, size)
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def _taken(self, create: bool) -> np.ndarray | None:
        """The shared count of batches taken (made by the main process; None once it is discarded)."""
        if self._progress is None:
            try:
                counter = self._map(f"/{_BLOCK_PREFIX}{self.token}_n", 8, create=create)
            except (FileNotFoundError, ValueError):
                return None
            self._progress = np.frombuffer(counter, np.int64)
        return self._progress

    def write(self, batch: int, key: int, shape: tuple[int, ...], dtype: np.dtype, offset: int,
              rows: list[np.ndarray]) -> None:
        block = self._map(self.name(batch, key), _nbytes(shape, dtype), create=True)
        view = np.frombuffer(block, dtype).reshape(shape)
        try:
            _write_rows(view, offset, rows)
        finally:
            del view
            try:
                block.close()  # this worker's mapping only: the pages stay for the main process
            except BufferError:
                pass  # a traceback still holds the view: the mapping goes with it
        self._reap(key + 1)

    def _reap(self, keys: int) -> None:
        taken = self._taken(create=False)
        if taken is None:
            return
        until = int(taken[0]) - self.keep
        for old in range(self._reaped, until):
            for key in range(keys):
                self._unlink(self.name(old, key))  # every worker tries: the first one frees it
        self._reaped = max(self._reaped, until)

    def take(self, batch: int, key: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        block = self._map(self.name(batch, key), _nbytes(shape, dtype), create=False)
        self._taken(create=True)[0] = batch + 1  # after the mapping: a worker may unlink it from now on
        return np.frombuffer(block, dtype).reshape(shape)  # unmapped with the last view

    def _unlink(self, name: str) -> bool:
        try:
            _posixshmem.shm_unlink(name)
        except FileNotFoundError:
            return False
        resource_tracker.unregister(name, _TRACKER_TYPE)
        return True

    def discard(self, batches: range, keys: int) -> None:
        """Unlinks the blocks of `batches` that workers may have begun or not yet unlinked, and the
        counter (call once the workers have stopped)."""
        for batch in batches:
            for key in range(keys):
                self._unlink(self.name(batch, key))
        self._unlink(f"/{_BLOCK_PREFIX}{self.token}_n")
        self._progress = None


class _ChunkWriter:
    """Grain batch_fn in the workers: C (k, example) pairs -> one chunk dict.

    The `direct_keys` rows go into their batch's block; the other keys are stacked.
    The chunk says which batch it belongs to ("_batch") and the row shape and dtype
    of each direct key ("_rows"), which every chunk of a batch must share.
    """

    def __init__(self, blocks, direct_keys: tuple[str, ...], local_batch: int, first_batch: int):
        self.blocks, self.direct_keys = blocks, direct_keys
        self.local_batch, self.first_batch = local_batch, first_batch

    def __call__(self, items: list[tuple[int, dict]]) -> dict[str, Any]:
        first = items[0][0]
        batch, offset = divmod(first, self.local_batch)
        if items[-1][0] != first + len(items) - 1 or offset + len(items) > self.local_batch:
            raise AssertionError(f"a chunk must be consecutive examples of one batch, got {[k for k, _ in items]}")
        examples = [example for _, example in items]
        chunk: dict[str, Any] = {key: np.stack([example[key] for example in examples])
                                 for key in examples[0] if key not in self.direct_keys}
        chunk["_batch"] = self.first_batch + batch
        chunk["_rows"] = []
        for index, key in enumerate(self.direct_keys):
            rows = [np.asarray(example[key]) for example in examples]
            shape, dtype = rows[0].shape, rows[0].dtype
            if any(row.shape != shape or row.dtype != dtype for row in rows):
                raise ValueError(f"the {key!r} arrays of one batch must share shape and dtype, got "
                                 f"{sorted({(row.shape, row.dtype.str) for row in rows})}")
            self.blocks.write(self.first_batch + batch, index, (self.local_batch, *shape), dtype, offset, rows)
            chunk["_rows"].append((shape, dtype.str))
        return chunk


class _BatchAssembler:
    """Grain batch_fn in the main process: the chunks of one batch -> the batch (no copy of the direct keys)."""

    def __init__(self, blocks, direct_keys: tuple[str, ...], local_batch: int, join: Callable[[list[dict]], dict]):
        self.blocks, self.direct_keys, self.local_batch, self.join = blocks, direct_keys, local_batch, join

    def __call__(self, chunks: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        batch_index = int(chunks[0]["_batch"])
        rows = [tuple(r) for r in chunks[0]["_rows"]]
        for chunk in chunks[1:]:
            if int(chunk["_batch"]) != batch_index or [tuple(r) for r in chunk["_rows"]] != rows:
                raise AssertionError(f"chunks of batch {batch_index} disagree: batch {int(chunk['_batch'])}, "
                                     f"rows {chunk['_rows']} vs {rows}")
        batch = self.join([{key: value for key, value in chunk.items() if not key.startswith("_")}
                           for chunk in chunks])
        for index, (key, (shape, dtype)) in enumerate(zip(self.direct_keys, rows)):
            batch[key] = self.blocks.take(batch_index, index, (self.local_batch, *shape), np.dtype(dtype))
        return batch


def _mark_absl_flags_parsed() -> None:
    if not flags.FLAGS.is_parsed():  # Grain reads absl flags; our CLIs parse with argparse
        flags.FLAGS.mark_as_parsed()


class ParallelBatches(grain.IterDataset):
    """Batches of `local_batch` examples `make_example(0), make_example(1), ...` made in parallel.

    `make_example(k)` must be a pure function of k returning a dict of arrays (it is
    pickled into the workers); `join(chunks)` turns the stacked chunks of one batch
    into the batch. The arrays under `direct_keys` (the same shape in every example)
    are written straight into the batch's array instead, and `join` never sees them.
    `num_batches` None means endless.
    """

    def __init__(self, make_example: Callable[[int], dict], join: Callable[[list[dict]], dict], *,
                 local_batch: int, num_batches: int | None, workers: int, read_threads: int,
                 chunk_examples: int = MAX_CHUNK_EXAMPLES, direct_keys: tuple[str, ...] = ()):
        super().__init__()
        self.make_example, self.join = make_example, join
        self.local_batch, self.num_batches = local_batch, num_batches
        self.workers, self.read_threads = workers, max(1, read_threads)
        self.chunk = chunk_size(local_batch, chunk_examples)
        shared_memory = _posixshmem is not None
        self.direct_keys = tuple(direct_keys) if shared_memory or workers == 0 else ()

    def blocks(self, first_batch: int) -> _LocalBlocks | _SharedBlocks:
        """Where the workers of a pipeline that starts at `first_batch` write the direct keys' rows."""
        return _SharedBlocks(first_batch, keep=TAKEN_BATCHES_KEPT) if self.workers > 0 else _LocalBlocks()

    def in_flight(self) -> int:
        """How many batches past the next one the workers may have begun: each holds at most its buffered
        chunks, the one it is putting and the one it is making, and the main process a few more per worker."""
        chunks_ahead = (WORKER_BUFFER_CHUNKS + 6) * max(1, self.workers)
        return 2 * (-(-chunks_ahead * self.chunk // self.local_batch) + 1)

    def pipeline(self, first_batch: int, blocks: _LocalBlocks | _SharedBlocks) -> grain.IterDataset:
        """The batches from `first_batch` on, as a Grain pipeline whose direct keys go through `blocks`."""
        count = None if self.num_batches is None else (self.num_batches - first_batch) * self.local_batch
        per_round = self.chunk * max(1, self.workers)
        length = (sys.maxsize // per_round) * per_round if count is None else -(-count // per_round) * per_round
        examples = grain.MapDataset.range(length).map(_WorkerMajorExamples(
            self.make_example, first_batch * self.local_batch, count, self.chunk, self.workers))
        chunks = examples.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                            prefetch_buffer_size=2 * self.read_threads))
        chunks = chunks.batch(self.chunk, batch_fn=_ChunkWriter(blocks, self.direct_keys, self.local_batch,
                                                                first_batch))
        if self.workers > 0:
            _mark_absl_flags_parsed()
            chunks = grain.experimental.WithOptionsIterDataset(
                chunks, grain.experimental.DatasetOptions(min_shm_size=PICKLED_BELOW_BYTES))
            chunks = chunks.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=WORKER_BUFFER_CHUNKS))
        return chunks.batch(self.local_batch // self.chunk, drop_remainder=True,
                            batch_fn=_BatchAssembler(blocks, self.direct_keys, self.local_batch, self.join))

    def __iter__(self) -> "_ResumableIterator":
        return _ResumableIterator(self)

    def __str__(self) -> str:
        return (f"ParallelBatches(local_batch={self.local_batch}, chunk={self.chunk}, workers={self.workers}, "
                f"read_threads={self.read_threads})")


class _ResumableIterator(grain.DatasetIterator):
    """Counts batches; the pipeline behind it starts lazily, from the counted batch."""

    def __init__(self, batches: ParallelBatches):
        super().__init__()
        self._batches = batches
        self._next_index = 0
        self._inner: Any = None
        self._blocks: Any = None

    def _start(self) -> None:
        if self._inner is None:
            self._blocks = self._batches.blocks(self._next_index)
            self._inner = iter(self._batches.pipeline(self._next_index, self._blocks))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches.num_batches is not None and self._next_index >= self._batches.num_batches:
            self.close()  # the workers are done: free what they left named
            raise StopIteration
        self._start()
        batch = next(self._inner)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_index": self._next_index}

    def set_state(self, state: dict[str, Any]) -> None:
        if "next_index" not in state:
            raise ValueError(f"not a training-data iterator state (no next_index): {state!r}")
        self.close()
        self._next_index = int(state["next_index"])

    def start_prefetch(self) -> None:
        self._start()
        self._inner.start_prefetch()

    def close(self) -> None:
        """Stops the workers, then frees the blocks of the batches they had begun."""
        if self._inner is not None:
            self._inner.close()
            self._inner = None
            reach = self._batches.in_flight() + TAKEN_BATCHES_KEPT
            self._blocks.discard(range(max(0, self._next_index - reach), self._next_index + reach),
                                 len(self._batches.direct_keys))
