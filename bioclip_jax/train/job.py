"""The main job: data (synthetic when none is given) -> train -> held-out zero-shot -> export.

`python -m bioclip_jax.train --config=configs/synthetic_tiny.py --workdir=DIR` runs all of
it; with `--config.data.train_shards=...` the same command trains on real shards.
"""

from __future__ import annotations

import os

import jax
import ml_collections

from bioclip_jax.train.loop import train
from bioclip_jax.train.periodic_eval import eval_fn_from_config, text_types

SYNTHETIC_DIR = "synthetic"
EXPORT_DIR = "open_clip"


def with_synthetic_data(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Generates the synthetic tree of life into WORKDIR/synthetic when no shards are given."""
    if config.data.train_shards:
        return config
    from bioclip_jax.data.synthetic import make_synthetic  # noqa: PLC0415
    root = os.path.join(workdir, SYNTHETIC_DIR)
    if jax.process_index() == 0 and not os.path.exists(os.path.join(root, "info.json")):
        syn = config.data.synthetic
        print(f"no data.train_shards given: generating the synthetic tree of life into {root}", flush=True)
        make_synthetic(root, species=syn.species, images_per_species=syn.images_per_species,
                       held_out_species=syn.held_out_species, seed=syn.seed, image_size=syn.image_size,
                       overwrite=True, progress=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415
        multihost_utils.sync_global_devices("synthetic data written")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy; fields stay the same
    config.data.train_shards = os.path.join(root, "train")
    if not config.eval.held_out_dir:
        config.eval.held_out_dir = os.path.join(root, "held_out", "images")
        config.eval.taxa_file = os.path.join(root, "held_out", "taxa.csv")
    return config


def run_job(config: ml_collections.ConfigDict, workdir: str, stop_after: int | None = None) -> dict:
    config = with_synthetic_data(config, workdir)
    eval_fn = eval_fn_from_config(config)
    last = train(config, workdir, stop_after=stop_after, eval_fn=eval_fn)
    finished = stop_after is None or stop_after >= config.total_steps
    if not finished:
        return last
    from bioclip_jax.pretrained import create_model, export_open_clip  # noqa: PLC0415
    model = create_model(None, workdir)  # on every process: Orbax's restore is collective
    if jax.process_index() != 0:
        return last
    export_dir = os.path.join(workdir, EXPORT_DIR)
    export_open_clip(model, export_dir)
    if eval_fn is not None:
        print(held_out_report(last, text_types(config)))
    print(f"exported the model to {export_dir} (open_clip: create_model_and_transforms('local-dir:{export_dir}'))")
    return last


def held_out_report(metrics: dict, types: list[str]) -> str:
    """A small table: zero-shot top-1 on held-out species per text type and rank, with chance."""
    ranks = ["", "_genus", "_family", "_order", "_class", "_phylum", "_kingdom"]
    header = ["text type", "species", "genus", "family", "order", "class", "phylum", "kingdom"]
    lines = ["held-out species, zero-shot top-1 (%):", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for text_type in types:
        cells = [metrics.get(f"eval/{text_type}/zero_shot_top1{r}") for r in ranks]
        lines.append("| " + " | ".join([text_type] + ["-" if c is None else f"{c:.1f}" for c in cells]) + " |")
    chance = metrics.get("eval/chance_top1")
    if chance is not None:
        lines.append(f"chance (species): {chance:.1f}%")
    return "\n".join(lines)
