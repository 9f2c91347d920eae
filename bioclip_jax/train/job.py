"""The main job: data (synthetic when none is given) -> train -> held-out zero-/few-shot -> export.

`python -m bioclip_jax.train --config=configs/synthetic_tiny.py --workdir=DIR` runs all of
it; with `--config.data.train_shards=...` the same command trains on real shards. A finished
run leaves WORKDIR/results.json, results.md and results.png (the eval binary's files, of the
final held-out evaluation), the open_clip export and DONE.
"""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from bioclip_jax import paths
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.evaluate import results_files
from bioclip_jax.exit_codes import DONE_FILE
from bioclip_jax.pretrained import create_model, export_open_clip
from bioclip_jax.synthetic.dataset import make_synthetic
from bioclip_jax.train.loop import train
from bioclip_jax.train.periodic_eval import HeldOutEval, eval_fn_from_config

log = logging.getLogger(__name__)

SYNTHETIC_DIR = "synthetic"
EXPORT_DIR = "open_clip"


def with_synthetic_data(config: ml_collections.ConfigDict, workdir) -> ml_collections.ConfigDict:
    """Generates the synthetic tree of life when no shards are given.

    It goes to WORKDIR/synthetic for a local workdir (written once, by process 0). For a
    cloud workdir (gs://) every process writes the same seeded dataset to its own local
    cache instead: image files are read by path, and a pod's hosts share no disk.
    """
    if config.data.train_shards:
        return config
    syn = config.data.synthetic
    if not paths.is_remote(workdir):
        root, writer = os.path.join(os.fspath(workdir), SYNTHETIC_DIR), jax.process_index() == 0
    else:
        name = f"s{syn.species}-i{syn.images_per_species}-h{syn.held_out_species}-seed{syn.seed}-px{syn.image_size}"
        root, writer = os.path.join(os.path.expanduser("~/.cache/bioclip_jax/synthetic"), name), True
    if writer and not os.path.exists(os.path.join(root, "info.json")):
        log.info(f"no data.train_shards given: generating the synthetic tree of life into {root}")
        make_synthetic(root, species=syn.species, images_per_species=syn.images_per_species,
                       held_out_species=syn.held_out_species, seed=syn.seed, image_size=syn.image_size,
                       overwrite=True, progress=log.isEnabledFor(logging.INFO))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("synthetic data written")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; fields stay the same
    config.data.train_shards = os.path.join(root, "train")
    if not config.eval.held_out_dir:  # absolute: `eval --workdir` reads it back from config.json, from anywhere
        config.eval.held_out_dir = os.path.abspath(os.path.join(root, "held_out", "images"))
        config.eval.taxa_file = os.path.abspath(os.path.join(root, "held_out", "taxa.csv"))
    return config


def run_job(config: ml_collections.ConfigDict, workdir, stop_after: int | None = None,
            allow_config_change: bool = False, allow_fresh_start: bool = False) -> dict:
    """Trains, then (only when the whole schedule ran) exports and marks WORKDIR/DONE.

    A stop (signal or preemption) returns with "stopped": True and exports nothing: the
    scheduler's grace period is spent on the checkpoint, and the unfinished model is not
    mistaken for a result.
    """
    finished_at = done_step(workdir)
    if finished_at is not None and finished_at >= config.total_steps:
        if jax.process_index() == 0:
            log.info(f"{workdir} finished its {finished_at} steps already ({DONE_FILE}); nothing to do. Raise "
                     f"--config.total_steps to train on, or use a new workdir.")
        return {}
    check_not_past_schedule(workdir, config.total_steps)
    config = with_synthetic_data(config, workdir)
    eval_fn = eval_fn_from_config(config)
    last = train(config, workdir, stop_after=stop_after, eval_fn=eval_fn, allow_config_change=allow_config_change,
                 allow_fresh_start=allow_fresh_start)
    if last.get("stopped") or (stop_after is not None and stop_after < config.total_steps):
        return last
    model = create_model(None, os.fspath(workdir))  # on every process: Orbax's restore is collective
    if jax.process_index() != 0:
        return last
    export_dir = epath.Path(workdir) / EXPORT_DIR
    export_open_clip(model, os.fspath(export_dir))
    written = write_results(eval_fn, workdir, config)
    mark_done(workdir, config.total_steps)
    if written:
        log.info(f"wrote {', '.join(written)}")
    log.info(f"exported the model to {export_dir} "
             f"(open_clip: create_model_and_transforms('local-dir:{export_dir}'))")
    return last


def write_results(eval_fn: HeldOutEval | None, workdir, config: ml_collections.ConfigDict) -> list[str]:
    """WORKDIR/results.{json,md,png} from the final held-out evaluation, as the eval binary writes them."""
    if eval_fn is None or eval_fn.last_step != config.total_steps:
        return []
    about = eval_fn.about(os.fspath(workdir), config.model.name)
    destination = os.fspath(epath.Path(workdir) / results_files.RESULTS_JSON)
    return results_files.write_results(eval_fn.last_records, destination, about)


def mark_done(workdir, step: int) -> None:
    """WORKDIR/DONE: the run finished its schedule and its export is complete."""
    paths.write_atomically(epath.Path(workdir) / DONE_FILE,
                           json.dumps({"step": int(step), "time": time.time()}) + "\n")


def done_step(workdir) -> int | None:
    """The step WORKDIR/DONE records, or None when the run has not finished."""
    path = paths.uncached(epath.Path(workdir) / DONE_FILE)
    if not path.exists():
        return None
    record = paths.read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise ValueError(f"{path} is damaged: it holds no step number; delete it and rerun to finish the run again")
    return record["step"]


def check_not_past_schedule(workdir, total_steps: int) -> None:
    """Refuses a schedule shorter than the run's latest checkpoint: training could not stop at
    `total_steps`, and the export would hold a later step than DONE says."""
    steps = model_dir.finished_steps(workdir)
    if steps and steps[-1] > total_steps:
        raise ValueError(f"{workdir} has a checkpoint at step {steps[-1]}, past --config.total_steps={total_steps}: "
                         f"a run cannot end before its latest checkpoint; set total_steps to at least {steps[-1]} "
                         f"or use a new workdir")
