"""Training metrics: WORKDIR/metrics.jsonl, TensorBoard events, and a progress line with ETA.

WORKDIR may be local or in a bucket (gs://...); a bucket object cannot be appended to,
so there each record rewrites the file (see `paths.append_line`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Mapping

import jax
from etils import epath

from bioclip_jax import paths
from bioclip_jax.checkpoint import model_dir

METRICS_FILE = model_dir.METRICS_FILE


class MetricsWriter:
    """Writes one JSON object per logged step; only process 0 writes."""

    def __init__(self, workdir: paths.PathLike, total_steps: int):
        self.enabled = jax.process_index() == 0
        self.total_steps = total_steps
        self.path = epath.Path(workdir) / METRICS_FILE
        self._tb = None
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            try:
                from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional dependency
                self._tb = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
            except ImportError:
                print("tensorboardX is not installed: TensorBoard events are not written", file=sys.stderr)
        self._start_time = time.time()
        self._start_step: int | None = None

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        paths.append_line(self.path, json.dumps(record))
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def drop_after(self, step: int) -> None:
        """Forgets records past `step`: a run resumed from that checkpoint logs those steps again."""
        if self.enabled:
            drop_after(self.path.parent, step)

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


def _lines(workdir: paths.PathLike) -> list[str]:
    path = paths.uncached(epath.Path(workdir) / METRICS_FILE)
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def read_metrics(workdir: paths.PathLike) -> list[dict]:
    return [json.loads(line) for line in _lines(workdir) if line.strip()]


def _up_to(line: str, step: int) -> bool:
    try:
        return json.loads(line).get("step", step) <= step
    except (ValueError, AttributeError, TypeError):
        return False  # a line cut short when a run was killed mid-write


def drop_after(workdir: paths.PathLike, step: int) -> int:
    """Removes the records of steps after `step` (and damaged lines) from WORKDIR/metrics.jsonl.

    Returns how many lines went. A resumed run repeats the steps after its checkpoint.
    """
    lines = [line for line in _lines(workdir) if line.strip()]
    kept = [line for line in lines if _up_to(line, step)]
    if len(kept) < len(lines):
        paths.write_atomically(epath.Path(workdir) / METRICS_FILE, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)
