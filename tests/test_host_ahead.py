"""The host runs ahead of the devices: step N+1 is dispatched before step N's metrics are read,
and batches are prepared by a prefetch thread.

The step is wrapped so that its metrics are probes: reading one (as `jax.device_get`
does) is recorded in the same event log as each dispatch. The order of the log, not
a clock, shows whether the host waited for the step it had just dispatched.
"""

import json
import threading

import numpy as np
import pytest

from bioclip_jax.train import loop, prefetch
from bioclip_jax.train.prefetch import DevicePrefetcher
from train_helpers import run, shards  # noqa: F401 - shards is a fixture


class _ReadProbe:
    """One metric of one step; `np.asarray` on it (the host read) goes into the event log."""

    def __init__(self, value, step: int, events: list, poison: bool):
        self.value, self.step, self.events, self.poison = value, step, events, poison

    def __array__(self, dtype=None, copy=None):
        self.events.append(("read", self.step))
        value = np.asarray(self.value, dtype)
        return np.full_like(value, np.nan) if self.poison else value


def _probing_step_factory(events: list, nan_loss_at: int):
    real_make_train_step = loop.make_train_step

    def make_train_step(*args, **kwargs):
        step_fn = real_make_train_step(*args, **kwargs)

        def step(state, batch):
            number = sum(kind == "dispatch" for kind, _ in events) + 1
            events.append(("dispatch", number))
            state, metrics = step_fn(state, batch)
            return state, {name: _ReadProbe(value, number, events, name == "loss" and number == nan_loss_at)
                           for name, value in metrics.items()}
        return step

    return make_train_step


def test_the_next_step_is_dispatched_before_a_logged_step_is_read(shards, tmp_path, monkeypatch):
    events: list = []
    monkeypatch.setattr(loop, "make_train_step", _probing_step_factory(events, nan_loss_at=4))
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 4;"):  # still the step it came from
        run(tmp_path / "ahead", shards, total_steps=6, log_every_steps=2, checkpoint__every_steps=100)

    def first(event):
        assert event in events, f"{event} never happened: {events}"
        return events.index(event)

    for logged in (2, 4):
        assert first(("dispatch", logged + 1)) < first(("read", logged)), \
            f"step {logged}'s metrics were read before step {logged + 1} was dispatched: {events}"
    assert ("dispatch", 6) not in events  # the non-finite loss stopped the run at once


class _CloseSpy:
    """The loop's real data iterator, recording whether it was closed."""

    def __init__(self, inner):
        self.inner, self.closed = inner, False

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)

    def __getattr__(self, name):  # get_state, set_state
        return getattr(self.inner, name)

    def close(self):
        self.closed = True
        if hasattr(self.inner, "close"):
            self.inner.close()


def test_the_data_iterator_is_closed_when_the_run_ends_and_when_it_fails(shards, tmp_path, monkeypatch):
    """Closing ends the Grain worker processes; a run that raises must not leave them running."""
    spies = []
    real_train_iterator = loop.train_iterator

    def spied_train_iterator(*args):
        spies.append(_CloseSpy(real_train_iterator(*args)))
        return spies[-1]

    monkeypatch.setattr(loop, "train_iterator", spied_train_iterator)
    run(tmp_path / "finished", shards, total_steps=3, checkpoint__every_steps=100)
    monkeypatch.setattr(loop, "make_train_step", _probing_step_factory([], nan_loss_at=2))
    with pytest.raises(FloatingPointError):
        run(tmp_path / "failed", shards, total_steps=4, log_every_steps=2, checkpoint__every_steps=100)
    assert [spy.closed for spy in spies] == [True, True]


# ----------------------------------------------------------------------------- the prefetch thread


class _CountingIterator:
    """Yields 0, 1, ...; its state is how many it gave; `fail_at` raises there, `block_at` never returns."""

    def __init__(self, length: int, fail_at: int | None = None, block_at: int | None = None):
        self.length, self.fail_at, self.block_at = length, fail_at, block_at
        self.drawn, self.taken, self.most_ahead = 0, 0, 0
        self.release = threading.Event()

    def __iter__(self):
        return self

    def __next__(self):
        if self.drawn == self.fail_at:
            raise ValueError(f"bad shard at batch {self.drawn}")
        if self.drawn == self.block_at:
            self.release.wait()  # a read that never ends (a hung network filesystem)
        if self.drawn == self.length:
            raise StopIteration
        self.drawn += 1
        self.most_ahead = max(self.most_ahead, self.drawn - self.taken)
        return self.drawn - 1

    def get_state(self):
        return {"next_index": self.drawn}


def _take(batches, source) -> list:
    taken = []
    for batch in batches:
        source.taken += 1
        taken.append((batch.host, batch.device, json.loads(batch.data_state.get_state())))
    return taken


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetched_batches_come_in_order_each_with_the_position_after_it(depth):
    source = _CountingIterator(8)
    with DevicePrefetcher(source, lambda host: host * 10, depth) as batches:
        taken = _take(batches, source)
    assert taken == [(i, i * 10, {"next_index": i + 1}) for i in range(8)]
    assert source.most_ahead <= depth + 1  # at most `depth` batches wait beyond the one in use


def test_a_data_error_comes_out_where_its_batch_would_have():
    source = _CountingIterator(8, fail_at=3)
    with DevicePrefetcher(source, lambda host: host, 2) as batches:
        assert [next(batches).host for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad shard at batch 3"):
            next(batches)
        with pytest.raises(ValueError, match="bad shard at batch 3"):  # and again, never a hang
            next(batches)


def test_closing_never_waits_for_a_read_that_hangs(monkeypatch):
    monkeypatch.setattr(prefetch, "_JOIN_SECONDS", 0.2)
    source = _CountingIterator(8, block_at=2)
    batches = DevicePrefetcher(source, lambda host: host, 2)
    assert next(batches).host == 0
    batches.close()  # returns although the thread is stuck in the third read
    source.release.set()
