"""Device prefetch: global batches placed on the devices ahead of the step (big_vision's `start_global`).

A background thread draws host batches from the data iterator, turns each into global
`jax.Array`s and keeps up to `depth` of them ready, so that batch N+1 is on its way to
the devices while step N runs. What the loop relies on:
- Batches come out of `next()` in the iterator's order, each once; an error raised by
  the data pipeline (or its end) comes out where that batch would have.
- Each batch carries the iterator's state right after it was drawn. A checkpoint of step
  N saves that state, not the state after the batches already prefetched, so a resume
  continues at batch N+1 exactly.
- `close()` never hangs on the thread: it stops taking batches and waits only briefly for
  a read in progress (the thread is a daemon).
`depth=0` draws and places each batch in the caller's thread, with the same results.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import queue
import threading
from typing import Any, Callable, Iterator

_POLL_SECONDS = 0.1  # how often a blocked thread looks at the stop flag
_JOIN_SECONDS = 5.0  # how long close() waits for a read in progress


@dataclasses.dataclass(frozen=True)
class PreparedBatch:
    host: Any  # what the data iterator yielded (numpy arrays, counters included)
    device: Any  # prepare(host): the global arrays the step takes
    data_state: "IteratorState"  # the iterator's position right after this batch


class IteratorState:
    """A data iterator's saved position, in the form Grain's Orbax handler writes (`get_state()` -> bytes)."""

    def __init__(self, state: Any):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=4).encode()


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException  # StopIteration included


class DevicePrefetcher:
    """Iterates PreparedBatch in order, keeping at most `depth` prepared and not yet taken."""

    def __init__(self, iterator: Iterator, prepare: Callable[[Any], Any], depth: int):
        if depth < 0:
            raise ValueError(f"config.data.prefetch_to_device must be >= 0, got {depth}")
        self._iterator, self._prepare, self.depth = iterator, prepare, depth
        self._failure: _Failure | None = None
        self._thread: threading.Thread | None = None
        if depth:
            self._ready: queue.Queue = queue.Queue()
            self._free_slots = threading.Semaphore(depth)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._fill, name="device-prefetch", daemon=True)
            self._thread.start()

    def _draw(self) -> PreparedBatch:
        host = next(self._iterator)
        state = IteratorState(copy.deepcopy(self._iterator.get_state()))
        return PreparedBatch(host, self._prepare(host), state)

    def _fill(self) -> None:
        while self._take_slot():
            try:
                item: PreparedBatch | _Failure = self._draw()
            except BaseException as error:  # noqa: BLE001 - handed to the consumer, in order
                item = _Failure(error)
            self._ready.put(item)
            if isinstance(item, _Failure):
                return

    def _take_slot(self) -> bool:
        while not self._stop.is_set():
            if self._free_slots.acquire(timeout=_POLL_SECONDS):
                return not self._stop.is_set()
        return False

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> PreparedBatch:
        if self._failure is not None:
            raise self._failure.error
        if not self.depth:
            return self._draw()
        while True:
            try:
                item = self._ready.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._ready.empty():
                    raise RuntimeError("the device-prefetch thread ended without a batch or an error") from None
        if isinstance(item, _Failure):
            self._failure = item
            raise item.error
        self._free_slots.release()
        return item

    def close(self) -> None:
        """Stops prefetching and drops the prepared batches (their device memory goes with them)."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=_JOIN_SECONDS)
        while not self._ready.empty():
            self._ready.get_nowait()

    def __enter__(self) -> "DevicePrefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
