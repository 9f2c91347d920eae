"""Evaluates every new checkpoint of a training run as it appears, so evaluation can run on
other hardware beside training.

Each finished step is evaluated once, into WORKDIR/eval/<step>/results.*, and logged to the
run's metrics.jsonl and TensorBoard; a step whose results exist is not evaluated again.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable

from etils import epath

from bioclip_jax import paths
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.evaluate import results
from bioclip_jax.evaluate.config import check_config
from bioclip_jax.evaluate.results_files import workdir_results_path
from bioclip_jax.evaluate.runner import evaluate
from bioclip_jax.models.params import assign_params
from bioclip_jax.pretrained import create_model
from bioclip_jax.tensorboard_events import EventLog

log = logging.getLogger(__name__)


def log_step(workdir, step: int, records: list[results.Record], writer: EventLog | None = None) -> None:
    """Adds one line to WORKDIR/metrics.jsonl and the scalars to TensorBoard."""
    line = {"step": step, "time": time.time()}
    line.update({_log_key(r): round(r.mean, 4) for r in records})
    paths.append_line(epath.Path(workdir) / model_dir.METRICS_FILE, json.dumps(line))
    if writer is not None:
        writer.scalars(step, {_log_key(r): r.mean for r in records})


def _log_key(record: results.Record) -> str:
    """eval/DATASET[/TEXT_TYPE]/METRIC: zero-shot keys name their text type."""
    middle = f"{record.text_type}/" if record.text_type else ""
    return f"eval/{record.dataset}/{middle}{record.metric}"


def _tensorboard(workdir) -> EventLog:
    return EventLog(epath.Path(workdir) / "tensorboard", suffix=".eval")


def watch(workdir, config, *, sleep: Callable[[float], None] = time.sleep) -> dict[int, list[results.Record]]:
    """Evaluates each finished checkpoint once, in step order, until none appears for watch_timeout s."""
    check_config(config)
    if not model_dir.is_model_dir(workdir):
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {model_dir.MODEL_JSON})")
    done = {s for s in model_dir.finished_steps(workdir) if epath.Path(workdir_results_path(workdir, s)).is_file()}
    model = None
    writer = _tensorboard(workdir)
    evaluated: dict[int, list[results.Record]] = {}
    last_new = time.monotonic()
    try:
        while True:
            new = [s for s in model_dir.finished_steps(workdir) if s not in done]
            for step in new:
                try:
                    if model is None:
                        model = create_model(None, pretrained=workdir, step=step)
                    else:
                        assign_params(model, model_dir.load_params(workdir, step), source=f"{workdir} step {step}")
                except (OSError, ValueError, FileNotFoundError) as error:
                    log.warning(f"step {step}: checkpoint unreadable ({error}); skipped")
                    done.add(step)
                    continue
                log.info(f"evaluating step {step}")
                records = evaluate(model, config, out=workdir_results_path(workdir, step),
                                   source=str(workdir), step=step)
                log_step(workdir, step, records, writer)
                evaluated[step] = records
                done.add(step)
            if new:
                last_new = time.monotonic()
            elif time.monotonic() - last_new > config.watch_timeout:
                return evaluated
            else:
                sleep(config.poll_seconds)
    finally:
        writer.close()
