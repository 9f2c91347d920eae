"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard events, and a progress line with ETA."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

import jax


class MetricsWriter:
    """Appends one JSON object per logged step; only process 0 writes."""

    def __init__(self, workdir: str, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional dependency
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:
                print("tensorboardX is not installed: TensorBoard events are not written", file=sys.stderr)
        self._start_time = time.time()
        self._start_step: int | None = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

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
        parts.append(f"eta {_duration(eta)}")
        print(" | ".join(parts), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return value
    return value if math.isfinite(value) else None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
