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

The iterator state is one counter, `{"next_index": batches taken}` (the same form
a plain Grain iterator saves), and restoring it rebuilds the pipeline from that
batch: a run resumes exactly, also with another worker count.

Memory bound per worker (or per main process, with no workers): at most
`2 * read_threads` examples in its threads, the chunk being stacked (twice: the list
and the array) and `WORKER_BUFFER_CHUNKS` chunks waiting for the main process, so
about 2 * read_threads + (WORKER_BUFFER_CHUNKS + 2) * C examples, with
C <= MAX_CHUNK_EXAMPLES. At 224 px (150 KB an example) and the defaults (8 threads,
C = 64, 2 chunks) that is 272 examples, about 41 MB, whatever the batch size (before:
two whole local batches: 4.9 GB for 32,768 examples). The main process holds up to
WORKER_BUFFER_CHUNKS chunks per worker besides the batch it is joining.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import grain
import numpy as np
from absl import flags

MAX_CHUNK_EXAMPLES = 64
WORKER_BUFFER_CHUNKS = 2
MAIN_PROCESS_CORES = 1  # the training loop's own thread: dispatch, host-to-device copies, batch joining


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
    """MapDataset.map transform: element index -> the example worker-major order puts there (None past the end)."""

    def __init__(self, make_example: Callable[[int], dict], first: int, count: int | None, chunk: int, workers: int):
        self.make_example, self.first, self.count = make_example, first, count
        self.chunk, self.workers = chunk, workers

    def __call__(self, index: int) -> dict | None:
        example = worker_major(int(index), self.chunk, self.workers)
        if self.count is not None and example >= self.count:
            return None  # pads the last round of chunks; Grain drops Nones
        return self.make_example(self.first + example)


def _mark_absl_flags_parsed() -> None:
    if not flags.FLAGS.is_parsed():  # Grain reads absl flags; our CLIs parse with argparse
        flags.FLAGS.mark_as_parsed()


class ParallelBatches(grain.IterDataset):
    """Batches of `local_batch` examples `make_example(0), make_example(1), ...` made in parallel.

    `make_example(k)` must be a pure function of k returning a dict of arrays (it is
    pickled into the workers); `join(chunks)` turns the stacked chunks of one batch
    into the batch. `num_batches` None means endless.
    """

    def __init__(self, make_example: Callable[[int], dict], join: Callable[[list[dict]], dict], *,
                 local_batch: int, num_batches: int | None, workers: int, read_threads: int,
                 chunk_examples: int = MAX_CHUNK_EXAMPLES):
        super().__init__()
        self.make_example, self.join = make_example, join
        self.local_batch, self.num_batches = local_batch, num_batches
        self.workers, self.read_threads = workers, max(1, read_threads)
        self.chunk = chunk_size(local_batch, chunk_examples)

    def pipeline(self, first_batch: int) -> grain.IterDataset:
        """The batches from `first_batch` on, as a Grain pipeline."""
        count = None if self.num_batches is None else (self.num_batches - first_batch) * self.local_batch
        per_round = self.chunk * max(1, self.workers)
        length = (sys.maxsize // per_round) * per_round if count is None else -(-count // per_round) * per_round
        examples = grain.MapDataset.range(length).map(_WorkerMajorExamples(
            self.make_example, first_batch * self.local_batch, count, self.chunk, self.workers))
        chunks = examples.to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads,
                                                            prefetch_buffer_size=2 * self.read_threads))
        chunks = chunks.batch(self.chunk)
        if self.workers > 0:
            _mark_absl_flags_parsed()
            chunks = chunks.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self.workers, per_worker_buffer_size=WORKER_BUFFER_CHUNKS))
        return chunks.batch(self.local_batch // self.chunk, drop_remainder=True, batch_fn=self.join)

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

    def _start(self) -> None:
        if self._inner is None:
            self._inner = iter(self._batches.pipeline(self._next_index))

    def __next__(self) -> dict[str, np.ndarray]:
        if self._batches.num_batches is not None and self._next_index >= self._batches.num_batches:
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
        if self._inner is not None:
            self._inner.close()
            self._inner = None
