"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard events, and a progress line with ETA.

metrics.jsonl is a line log (`paths.append_line`) that `eval --watch` adds to as well: a
local file, or in a bucket (gs://...) one object per line under metrics.jsonl.d/, each
tagged with its writer, merged by `read_metrics`. A resumed run drops only the training's
own rows past its checkpoint (it logs those steps again), never the watch's: in a bucket
the training's objects say "train" in their name; locally, a watch row carries the time
it was written (evaluate/watch.log_step), which a training row does not.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath

from bioclip_jax import console, paths
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.tensorboard_events import EventLog

log = logging.getLogger(__name__)

METRICS_FILE = model_dir.METRICS_FILE
TENSORBOARD_DIR = "tensorboard"
WRITER = "train"  # the tag of the training's rows in a bucket's line log


class MetricsWriter:
    """Writes one JSON object per logged step; only process 0 writes."""

    def __init__(self, workdir: paths.PathLike, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tb = None
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            self._tb = EventLog(epath.Path(workdir) / TENSORBOARD_DIR)
        self._start_time = time.time()
        self._start_step: int | None = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        paths.append_line(self.path, json.dumps(record), writer=WRITER)
        if self._tb is not None:
            self._tb.scalars(step, {k: v for k, v in record.items() if k != "step"})

    def drop_after(self, step: int) -> None:
        """Forgets the training's records past `step`: a run resumed from that checkpoint logs those steps
        again (at the end of the schedule, also the final evaluation at `step`, which it repeats)."""
        if self.enabled:
            drop_after(self.path.parent, step, final_eval_repeated=step >= self.total_steps)

    def progress(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        if self._start_step is None:
            self._start_step, self._start_time = step, time.time()
        done = step - self._start_step
        elapsed = time.time() - self._start_time
        eta = (self.total_steps - step) * elapsed / done if done > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {metrics[k]:.4g}" for k in ("loss", "lr", "logit_scale", "images_per_sec") if k in metrics]
        if "mfu" in metrics and math.isfinite(metrics["mfu"]):
            parts.append(f"mfu {metrics['mfu']:.1%}")
        parts.append(f"eta {console.duration(eta)}")
        log.info(" | ".join(parts))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def step_record(metrics: Mapping[str, Any], seconds_per_step: float, skipped: int, *, batch_size: int,
                flops_per_step: float, peak_tflops: float) -> dict:
    """One logged step: the step's own metrics plus throughput, MFU and the skipped-sample count."""
    record = {k: float(v) for k, v in metrics.items()}
    record["images_per_sec"] = batch_size / seconds_per_step
    record["seconds_per_step"] = seconds_per_step
    tflops = flops_per_step / seconds_per_step / jax.device_count() / 1e12
    record["model_tflops_per_device"] = tflops
    record["mfu"] = tflops / peak_tflops if math.isfinite(peak_tflops) else float("nan")
    record["skipped_samples"] = skipped
    return record


@dataclasses.dataclass(frozen=True)
class _Held:
    step: int
    metrics: Any  # the step's device arrays, not read yet
    skipped: np.ndarray  # this process's skipped-sample counts up to the step


class OneStepLate:
    """Reads a logging step's metrics only once the next step is dispatched.

    Reading them at once would make the host wait for the step it has just queued, and
    the devices would then idle while the host prepares the next one. `hold` keeps the
    arrays; `read` (after the next dispatch, or where the loop waits anyway: eval, save,
    stop, the last step) fetches them, writes the record and raises on a non-finite
    loss, naming the held step. Throughput is measured between reads, each of which
    returns once its step is done.

    `share(skipped) -> skipped samples over all processes` is the loop's exchange of
    counters among processes (`stopping.StopVote.exchange`).
    """

    def __init__(self, writer: MetricsWriter, share: Callable[[np.ndarray], int],
                 to_record: Callable[[Mapping[str, Any], float, int], dict], diverged_hint: Callable[[], str],
                 start_step: int):
        self._writer, self._share, self._to_record, self._diverged_hint = writer, share, to_record, diverged_hint
        self._held: _Held | None = None
        self._since_time, self._since_step = time.time(), start_step
        self.last: dict = {}

    def hold(self, step: int, metrics: Any, skipped: np.ndarray) -> None:
        self._held = _Held(step, metrics, np.array(skipped, copy=True))

    def read(self) -> None:
        """Writes the held step's record, if a step is held."""
        if self._held is None:
            return
        held, self._held = self._held, None
        metrics = jax.device_get(held.metrics)
        now = time.time()
        skipped = self._share(held.skipped)
        seconds_per_step = (now - self._since_time) / max(held.step - self._since_step, 1)
        self._since_time, self._since_step = now, held.step
        record = self._to_record(metrics, seconds_per_step, skipped)
        self._writer.write(held.step, record)
        self._writer.progress(held.step, record)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {held.step}; lower the lr or check the "
                                     f"data. {self._diverged_hint()}")
        self.last = record

    def restart_window(self, step: int) -> None:
        """Throughput from here on: time spent on something else (an eval) is not a step's."""
        self._since_time, self._since_step = time.time(), step


def _plain(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(value) else None


def read_metrics(workdir: paths.PathLike) -> list[dict]:
    """Every record of WORKDIR/metrics.jsonl (all writers, merged), oldest first; lines cut short are skipped."""
    records = []
    for line in paths.read_lines(epath.Path(workdir) / METRICS_FILE):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short when a run was killed mid-write
    return [r for r in records if isinstance(r, dict)]


def drop_after(workdir: paths.PathLike, step: int, final_eval_repeated: bool = False) -> int:
    """Removes the training's records of steps after `step` (and damaged lines) from WORKDIR/metrics.jsonl,
    and with `final_eval_repeated` its evaluation records at `step`. Returns how many lines (or, in a
    bucket, objects) went."""
    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:
            return False  # a line cut short when a run was killed mid-write
        if not isinstance(record, dict):
            return False
        if "time" in record or not isinstance(record.get("step"), int):
            return True  # not the training's: an `eval --watch` row
        if record["step"] != step:
            return record["step"] < step
        return "loss" in record or not final_eval_repeated

    return paths.rewrite_lines(epath.Path(workdir) / METRICS_FILE, keep, writer=WRITER)
