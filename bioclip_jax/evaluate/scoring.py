"""Scores one dataset: its images embedded once, then every requested metric from the stored embeddings.

Zero-shot is scored once per text type of `text_type` (a comma list), few-shot (nearest
centroid) and linear probe at each k of `shots` over `trials` draws, and, when the classes
have a taxonomy, the accuracy at each rank above species and the mean mistake distance.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from bioclip_jax.data.eval_sources import EvalData
from bioclip_jax.evaluate import few_shot, per_rank, results, zero_shot
from bioclip_jax.evaluate.config import parse_tasks, parse_text_types
from bioclip_jax.inference import ImageEmbedder, TextEmbedder, report_skipped
from bioclip_jax.models.clip import CLIP
from bioclip_jax.taxonomy import RANKS
from bioclip_jax.taxonomy.templates import get_templates

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Embedded:
    data: EvalData
    features: np.ndarray
    labels: np.ndarray


def embed_dataset(model: CLIP, data: EvalData, config, mesh=None) -> Embedded:
    """Image features of a whole dataset; with `mesh`, spread over the processes of that mesh."""
    embedder = ImageEmbedder(model, batch_size=config.batch_size, workers=config.workers, progress=config.progress,
                             mesh=mesh)
    out = embedder.embed_all(data.items(), total=len(data), desc=data.name)
    report_skipped(out.skipped)
    if not len(out.features):
        raise ValueError(f"{data.name}: no readable image")
    return Embedded(data, out.features, np.asarray(out.labels, np.int64))


def _rank_records(dataset: str, prefix: str, codes, predicted_by_trial, true_by_trial,
                  text_type: str = "") -> list[results.Record]:
    """Accuracy at genus .. kingdom and the mean mistake distance, averaged over trials."""
    per_trial = [per_rank.per_rank_accuracy(codes, p, t) for p, t in zip(predicted_by_trial, true_by_trial)]
    records = [results.summarise(dataset, f"{prefix}_{rank}", [a[rank] for a in per_trial], text_type=text_type)
               for rank in reversed(RANKS[:-1])]
    distances = [per_rank.mistake_distance(codes, p, t) for p, t in zip(predicted_by_trial, true_by_trial)]
    records.append(results.summarise(dataset, prefix.replace("_top1", "_mistake_distance"), distances, scale=1.0,
                                     text_type=text_type))
    return records


def score(model: CLIP, embedded: Embedded, config, mesh=None) -> list[results.Record]:
    """All requested metrics from one dataset's stored embeddings."""
    data, features, labels = embedded.data, embedded.features, embedded.labels
    tasks = parse_tasks(config.tasks)
    codes = per_rank.lineage_codes([c.taxon for c in data.classes]) if data.has_taxonomy else None
    records: list[results.Record] = []
    if "zero_shot" in tasks:
        classifier = TextEmbedder(model, batch_size=config.text_batch_size, progress=config.progress, mesh=mesh)
        for text_type in parse_text_types(config.text_type):
            texts = zero_shot.class_texts(data.classes, text_type)
            class_features = classifier.classes(texts, get_templates(config.templates),
                                                desc=f"{data.name} classes ({text_type})")
            top = zero_shot.top_k_classes(features, class_features, k=5)
            accuracy = zero_shot.top_k_accuracy(top, labels, ks=(1, 5))
            records += [results.summarise(data.name, f"zero_shot_top{k}", [accuracy[k]], text_type=text_type)
                        for k in (1, 5)]
            if codes is not None:
                records += _rank_records(data.name, "zero_shot_top1", codes, [top[:, 0]], [labels], text_type)
    for method, name in (("few_shot", ""), ("linear_probe", "_linear")):
        if method not in tasks:
            continue
        for k in config.shots:
            try:
                trials = few_shot.few_shot_trials(features, labels, int(k), config.trials,
                                                  "centroid" if method == "few_shot" else "linear")
            except ValueError as error:  # too few images per class for this k: the other metrics stand
                log.warning(f"{data.name}: {k}-shot skipped: {error}")
                continue
            prefix = f"{k}_shot{name}_top1"
            records.append(results.summarise(data.name, prefix, [t.accuracy for t in trials]))
            if codes is not None and method == "few_shot":
                records += _rank_records(data.name, prefix, codes, [t.predictions for t in trials],
                                         [labels[t.query] for t in trials])
    return records
