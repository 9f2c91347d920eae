"""Zero- and few-shot evaluation on held-out species, during training and at its end.

The held-out folder has one directory per species and (usually) a taxa.csv, so each
score comes per rank too. Several text types can be scored (`eval.text_type` is a
comma list): `com` shows whether common-name queries work, `taxon_com` is how the
paper scores BioCLIP. The scoring is the eval binary's (evaluate/scoring.py): zero-shot
with the OpenAI templates, SimpleShot few-shot at k = 1 and 5 over 5 trials.

Each evaluation returns the scalars the loop logs to metrics.jsonl, prints one line on
process 0, and keeps its records so the main job can write them as results files.
"""

from __future__ import annotations

import logging

import jax

from bioclip_jax.evaluate.config import default_config
from bioclip_jax.evaluate.datasets import HELD_OUT_NAME, describe_dataset, open_dataset
from bioclip_jax.evaluate.results import Record
from bioclip_jax.evaluate.results_files import results_about
from bioclip_jax.evaluate.scoring import embed_dataset, score

log = logging.getLogger(__name__)


def text_types(config) -> list[str]:
    return [t.strip() for t in str(config.eval.text_type).split(",") if t.strip()]


class HeldOutEval:
    """(model, step, mesh) -> {"eval/<text type>/<metric>": value, "eval/<k>_shot_top1...": value}."""

    def __init__(self, config):
        spec = {"name": HELD_OUT_NAME, "data": f"folder:{config.eval.held_out_dir}",
                "taxa": config.eval.taxa_file or ""}
        self.eval_config = default_config()
        self.eval_config.tasks = "zero_shot,few_shot"
        self.eval_config.text_type = ",".join(text_types(config))
        self.eval_config.batch_size = config.eval.batch_size
        self.eval_config.progress = False
        self.eval_config.workers = 2
        self.data = open_dataset(spec, self.eval_config)
        self.dataset = describe_dataset(self.data, spec)
        self.last_step: int | None = None
        self.last_records: list[Record] = []

    def __call__(self, model, step: int, mesh=None) -> dict:
        """Scores `model`; with the training `mesh`, on its (sharded, multi-process) parameters as they are."""
        embedded = embed_dataset(model, self.data, self.eval_config, mesh=mesh)
        records = score(model, embedded, self.eval_config, mesh=mesh)
        self.last_step, self.last_records = step, records
        metrics = {"eval/chance_top1": 100.0 / len(self.data.classes)}
        for record in records:
            middle = f"{record.text_type}/" if record.text_type else ""
            metrics[f"eval/{middle}{record.metric}"] = record.mean
        if jax.process_index() == 0:
            log.info(summary_line(step, records, metrics["eval/chance_top1"]))
        return metrics

    def about(self, source: str, architecture: str | None = None) -> dict:
        """The header of the results files of the last evaluation."""
        return results_about(self.eval_config, [self.dataset], source, self.last_step, architecture)


def summary_line(step: int, records: list[Record], chance: float) -> str:
    """"eval step 100 held_out: zero-shot top-1 taxon_com 41.2% com 30.5% | 1-shot 38.0% 5-shot 55.1% (chance 5.0%)"."""
    zero = [f"{r.text_type} {r.mean:.1f}%" for r in records if r.metric == "zero_shot_top1"]
    shots = [f"{r.metric.split('_')[0]}-shot {r.mean:.1f}%" for r in records
             if r.metric.endswith("_shot_top1") and r.metric[0].isdigit()]
    dataset = records[0].dataset if records else HELD_OUT_NAME
    parts = [f"zero-shot top-1 {' '.join(zero)}"] if zero else []
    parts += [" ".join(shots)] if shots else []
    return f"eval step {step} {dataset}: {' | '.join(parts)} (chance {chance:.1f}%)"


def eval_fn_from_config(config) -> HeldOutEval | None:
    """The held-out evaluation of a training config, or None when no held-out set is set."""
    if not config.eval.held_out_dir:
        return None
    return HeldOutEval(config)
