"""Result records, results.json and the markdown table.

A record is {"dataset", "metric", "mean", "std", "trials"}. Accuracies are percentages
(as the BioCLIP paper reports them); `*_mistake_distance` is in ranks (1 = same genus).
Metric names: zero_shot_top1, zero_shot_top5, zero_shot_top1_genus, ...,
{k}_shot_top1, {k}_shot_top1_family, {k}_shot_linear_top1, zero_shot_mistake_distance.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Record:
    dataset: str
    metric: str
    mean: float
    std: float
    trials: int

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "metric": self.metric, "mean": round(self.mean, 4),
                "std": round(self.std, 4), "trials": self.trials}


def summarise(dataset: str, metric: str, values: Sequence[float], scale: float = 100.0) -> Record:
    """Mean and (population) std over trials, as BioCLIP computes them."""
    values = np.asarray(values, np.float64) * scale
    return Record(dataset, metric, float(values.mean()), float(values.std()), len(values))


def write_json(records: Iterable[Record], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump([r.to_json() for r in records], handle, indent=1)
    os.replace(path + ".tmp", path)


def read_json(path: str) -> list[Record]:
    with open(path, encoding="utf-8") as handle:
        rows = json.load(handle)
    try:
        return [Record(r["dataset"], r["metric"], float(r["mean"]), float(r["std"]), int(r["trials"])) for r in rows]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a results file (records need dataset, metric, mean, std, trials)") from error


_RANK_SUFFIXES = ("genus", "family", "order", "class", "phylum", "kingdom")


def split_metric(metric: str) -> tuple[str, str]:
    """("5_shot_top1", "genus") for "5_shot_top1_genus"; rank "" for headline metrics, "distance" for
    the mistake distance ("5_shot_mistake_distance" -> ("5_shot_top1", "distance"))."""
    if metric.endswith("_mistake_distance"):
        return metric[: -len("_mistake_distance")] + "_top1", "distance"
    for rank in _RANK_SUFFIXES:
        if metric.endswith("_top1_" + rank):
            return metric[: -len(rank) - 1], rank
    return metric, ""


def _method_order(metric: str) -> tuple:
    head = metric.split("_")[0]
    return (0 if head == "zero" else 1, int(head) if head.isdigit() else 0, "linear" in metric, metric)


def _cell(record: "Record | None") -> str:
    if record is None:
        return ""
    return f"{record.mean:.2f}" + (f" ± {record.std:.2f}" if record.trials > 1 else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_table(records: Sequence[Record]) -> str:
    """Headline metrics (one row per dataset) and, when classes had a taxonomy, accuracy per rank
    (one row per dataset and method) with the mean mistake distance in ranks."""
    if not records:
        return "(no results)\n"
    datasets = list(dict.fromkeys(r.dataset for r in records))
    cells = {(r.dataset, r.metric): r for r in records}
    headline = sorted({r.metric for r in records if split_metric(r.metric)[1] == ""}, key=_method_order)
    lines = _table(["dataset", *headline], [[d, *(_cell(cells.get((d, m))) for m in headline)] for d in datasets])
    ranked = sorted({split_metric(r.metric)[0] for r in records if split_metric(r.metric)[1]}, key=_method_order)
    if ranked:
        columns = ["species", *_RANK_SUFFIXES, "mistake distance"]
        rows = []
        for dataset in datasets:
            for method in ranked:
                names = [method, *(f"{method}_{rank}" for rank in _RANK_SUFFIXES),
                         method.replace("_top1", "_mistake_distance")]
                if any((dataset, n) in cells for n in names):
                    rows.append([dataset, method, *(_cell(cells.get((dataset, n))) for n in names)])
        lines += ["", "Accuracy per rank (a species prediction scored at each rank):", ""]
        lines += _table(["dataset", "method", *columns], rows)
    return "\n".join(lines) + "\n"
