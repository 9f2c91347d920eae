"""Runs the evaluation tasks of a config on a model: every dataset embedded once, scored, and written.

`evaluate(model, config)` opens each dataset (a missing one is reported and skipped), scores
it (evaluate/scoring.py) and writes results.json, results.md and results.png
(evaluate/results_files.py); the training job's final held-out evaluation writes the same
files, and `evaluate/watch.py` runs this for every new checkpoint of a training run.
"""

from __future__ import annotations

import logging
import re

from bioclip_jax import paths
from bioclip_jax.evaluate import plots, results
from bioclip_jax.evaluate.config import check_config
from bioclip_jax.evaluate.datasets import dataset_specs, describe_dataset, open_dataset
from bioclip_jax.evaluate.results_files import RESULTS_JSON, output_stem, results_about, write_results
from bioclip_jax.evaluate.scoring import Embedded, embed_dataset, score
from bioclip_jax.models.clip import CLIP

log = logging.getLogger(__name__)


def evaluate(model: CLIP, config, out: str | None = None, *, source: str | None = None,
             step: int | None = None) -> list[results.Record]:
    """Every dataset of the config; writes results.json, a markdown table and the bar chart (local or gs://)."""
    check_config(config)
    records: list[results.Record] = []
    described: list[dict] = []
    json_path = out or config.out or RESULTS_JSON
    for spec in dataset_specs(config):
        try:
            data = open_dataset(spec, config)
        except Exception as error:  # noqa: BLE001 - a missing dataset must not stop the suite
            log.warning(f"skipped dataset {spec.get('name') or spec['data']}: {error}")
            continue
        try:
            embedded = embed_dataset(model, data, config)
            found = score(model, embedded, config)
        except ValueError as error:
            log.warning(f"skipped dataset {data.name}: {error}")
            continue
        records += found
        described.append(describe_dataset(data, spec))
        if config.plot_embeddings:
            rank = config.plot_embeddings
            _plot_embeddings(embedded, rank, f"{output_stem(json_path)}_{_safe(data.name)}_{rank}.png")
    source = source if source is not None else (config.workdir or config.pretrained or None)
    written = write_results(records, json_path, results_about(config, described, source, step), config.plot)
    log.info(f"wrote {', '.join(written)}")
    return records


def _plot_embeddings(embedded: Embedded, rank: str, path: str) -> None:
    data = embedded.data
    if not data.has_taxonomy:
        log.warning(f"{data.name}: no taxonomy for --plot-embeddings={rank}; colouring by class")
        groups = [data.classes[i].name for i in embedded.labels]
    else:
        def name(taxon):
            return taxon.scientific_name if rank == "species" else taxon.lineage(rank)[-1]

        groups = [name(data.classes[i].taxon) for i in embedded.labels]
    with paths.local_stand_in(path) as local:
        plots.embedding_plot(embedded.features, groups, local, f"{data.name}: image embeddings by {rank} (PCA)")
    log.info(f"wrote {path}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
