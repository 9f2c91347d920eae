"""benchmarks/data.py's own machinery: deadlines instead of hangs, settling, the worker-count sweep."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import pytest

from test_shard_source import write_shards

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def data_bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    monkeypatch.delitem(sys.modules, "data", raising=False)
    import data  # benchmarks/data.py

    yield data
    sys.modules.pop("data", None)


class StallingLoader:
    """Gives `batches` batches, `seconds` apart, then waits forever, as a loader whose workers stopped would."""

    def __init__(self, batches: int, seconds: float = 0.0):
        self.left, self.seconds, self.closed = batches, seconds, False

    def __next__(self):
        if self.left == 0:
            threading.Event().wait()
        self.left -= 1
        time.sleep(self.seconds)
        return {"image": np.zeros((2, 16, 16, 3), np.uint8)}

    def close(self):
        self.closed = True


def sweep_args(**overrides) -> argparse.Namespace:
    options = dict(batch=8, batches=4, point_limit_s=1.0, text_type="com", image_size=16)
    options.update(overrides)
    return argparse.Namespace(**options)


def test_a_point_whose_loader_stalls_is_reported_not_waited_for(data_bench, monkeypatch):
    loader = StallingLoader(batches=6)  # 4 warm-up batches (2 chunks of 8 per worker), then 2 of the 4 timed
    monkeypatch.setattr(data_bench, "ours_loader", lambda *args, **kwargs: loader)
    monkeypatch.setattr(data_bench, "HARD_LIMIT_GRACE_S", 1.0)
    start = time.monotonic()
    point = data_bench.sweep_point(sweep_args(), [], workers=2)
    assert time.monotonic() - start < 10
    assert point["timed_out"] == "2 workers: nothing after 2 s" and point["batches"] == 2
    assert loader.closed


def test_a_slow_point_stops_at_its_limit_and_reports_the_batches_it_took(data_bench, monkeypatch):
    monkeypatch.setattr(data_bench, "ours_loader", lambda *args, **kwargs: StallingLoader(100, seconds=0.2))
    point = data_bench.sweep_point(sweep_args(batches=50), [], workers=1)
    assert point["stopped_by_limit"] and 0 < point["batches"] < 50
    assert point["images_per_s"] == pytest.approx(point["batches"] * 8 / point["seconds"])


def test_a_timed_call_has_a_deadline(data_bench):
    run = data_bench.pull(StallingLoader(batches=1), 4, [], limit_s=1.0, name="bioclip_jax")
    start = time.monotonic()
    with pytest.raises(data_bench.TimedOut, match="bioclip_jax: 4 batches: nothing after 1 s"):
        run()
    assert time.monotonic() - start < 10


def test_settle_leaves_out_the_cpu_it_spends_reading_counters(data_bench, monkeypatch):
    # With hundreds of worker threads, reading their counters took more than the idle share of a
    # core by itself, so every settle waited its maximum (20 s) before each timed call.
    def costly_reading():
        end = time.thread_time() + 0.03
        while time.thread_time() < end:
            pass
        return time.thread_time()  # the only CPU in the "tree" is this thread's own reading

    monkeypatch.setattr(data_bench, "tree_cpu_seconds", costly_reading)
    start = time.monotonic()
    assert data_bench.settle(max_seconds=5) is True
    assert time.monotonic() - start < 5


def test_drain_covers_what_each_loader_holds_not_8_batches_per_worker(data_bench):
    args = data_bench.parse_args(["--workers", "15", "--batch", "256", "--scaling", "15"])
    # Ours holds at most 8 chunks of 64 per worker, the reference 2 batches per worker: 30 batches, + 4.
    assert data_bench.drain_batches(args, "bioclip_jax", 15) == 34
    assert data_bench.drain_batches(args, "open_clip", 15) == 34
    small = data_bench.parse_args(["--workers", "2", "--batch", "32"])
    assert data_bench.drain_batches(small, "bioclip_jax", 2) == 20  # 8 per worker + 4, as before


def test_the_reference_refuses_shards_that_would_never_give_a_batch(data_bench, tmp_path):
    pytest.importorskip("webdataset")
    pytest.importorskip("open_clip_train")
    shards = write_shards(tmp_path / "s", 16, 8)  # 2 shards of 8: each of 2 workers reads 8 samples an epoch
    with pytest.raises(SystemExit, match="would never give a batch: one of its 2 workers reads 8 samples"):
        data_bench.open_clip_train_loader(shards, 16, 2, "com", 16)
    assert data_bench.open_clip_train_loader(shards, 8, 2, "com", 16) is not None


def test_scaling_sweep_reports_speed_and_main_process_cpu(data_bench, tmp_path, capsys):
    write_shards(tmp_path / "s", 32, 16)
    out = tmp_path / "scaling.json"
    status = data_bench.main(["--shards", str(tmp_path / "s" / "shard-{000000..000001}.tar"), "--image-size", "16",
                              "--text-type", "com", "--scaling", "0,1", "--batch", "8", "--batches", "3",
                              "--out", str(out)])
    assert status == 0
    record = json.loads(out.read_text())
    points = record["scaling"]
    assert [p["workers"] for p in points] == [0, 1] and record["scaling_settings"]["timed_out"] == []
    for point in points:
        assert point["batches"] == 3 and point["images"] == 24 and point["images_per_s"] > 0
        assert point["parent_cpu_us_per_image"] > 0 and point["workers_cpu_us_per_image"] >= 0
    assert points[1]["ratio_to_one_worker"] == 1.0
    assert "x 1 worker" in capsys.readouterr().out
