"""Zero-shot evaluation on held-out species, during training and at its end.

The held-out folder has one directory per species and (usually) a taxa.csv, so each
score comes per rank too. Several text types can be scored (`eval.text_type` is a
comma list): `com` shows whether common-name queries work, `taxon_com` is how the
paper scores BioCLIP.
"""

from __future__ import annotations

import copy

from bioclip_jax.data.eval_sources import open_eval_data
from bioclip_jax.evaluate import runner


def text_types(config) -> list[str]:
    return [t.strip() for t in str(config.eval.text_type).split(",") if t.strip()]


def eval_fn_from_config(config):
    """(model, step, mesh) -> {"eval/<text type>/<metric>": value}, or None when no held-out set is set."""
    if not config.eval.held_out_dir:
        return None
    data = open_eval_data(f"folder:{config.eval.held_out_dir}", name="held_out",
                          taxa=config.eval.taxa_file or None)
    eval_config = runner.default_config()
    eval_config.tasks = "zero_shot"
    eval_config.batch_size = config.eval.batch_size
    eval_config.progress = False
    eval_config.workers = 2

    def evaluate(model, step: int, mesh=None) -> dict:
        """Scores `model`; with the training `mesh`, on its (sharded, multi-process) parameters as they are."""
        embedded = runner.embed_dataset(model, data, eval_config, mesh=mesh)
        metrics = {"eval/chance_top1": 100.0 / len(data.classes)}
        for text_type in text_types(config):
            type_config = copy.deepcopy(eval_config)
            type_config.text_type = text_type
            for record in runner.score(model, embedded, type_config, mesh=mesh):
                metrics[f"eval/{text_type}/{record.metric}"] = record.mean
        return metrics

    return evaluate
