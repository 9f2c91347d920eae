"""Result records, results.json and the markdown table.

A record is {"dataset", "metric", "mean", "std", "trials"}, plus "text_type" on zero-shot
records (the class-name type they were scored with; few-shot uses image features only).
Accuracies are percentages (as the BioCLIP paper reports them); `*_mistake_distance` is in
ranks (1 = same genus). Metric names: zero_shot_top1, zero_shot_top5,
zero_shot_top1_genus, ..., {k}_shot_top1, {k}_shot_top1_family, {k}_shot_linear_top1,
zero_shot_mistake_distance.

results.json is {"model": {"source", "step", "architecture"}, "templates", "text_types",
"datasets": [{"name", "source", "path", "taxa", "classes", "images"}], "records": [...]};
`read_json` also reads the older plain list of records.

results.md has a title, what the numbers are of, the tables, and a key to reading them:
chance level, what "±" is, each text type and the mistake distance. It leaves the top-5
column out when no dataset has more than TOP5_MIN_CLASSES - 1 classes (results.json keeps it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np

from bioclip_jax import paths
from bioclip_jax.taxonomy.text_types import TEXT_TYPE_MEANINGS

# Top-5 accuracy is shown from this many classes on: with 5 or fewer it is always 100%, and up to 20
# a random guess already scores 25% or more.
TOP5_MIN_CLASSES = 21


@dataclasses.dataclass(frozen=True)
class Record:
    dataset: str
    metric: str
    mean: float
    std: float
    trials: int
    text_type: str = ""  # zero-shot only: the class-name type (com, taxon_com, ...)

    def to_json(self) -> dict:
        row = {"dataset": self.dataset, "metric": self.metric, "mean": round(self.mean, 4),
               "std": round(self.std, 4), "trials": self.trials}
        return {**row, "text_type": self.text_type} if self.text_type else row


def summarise(dataset: str, metric: str, values: Sequence[float], scale: float = 100.0,
              text_type: str = "") -> Record:
    """Mean and (population) std over trials, as BioCLIP computes them."""
    values = np.asarray(values, np.float64) * scale
    return Record(dataset, metric, float(values.mean()), float(values.std()), len(values), text_type)


def write_json(records: Iterable[Record], path: str, about: dict | None = None) -> None:
    """results.json: `about` (model, templates, text types, datasets) and the records."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    content = {**(about or {}), "records": [r.to_json() for r in records]}
    paths.write_atomically(path, json.dumps(content, indent=1))


def read_about(path: str) -> dict:
    """What results.json says besides its records (model, step, templates, datasets)."""
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    return {k: v for k, v in content.items() if k != "records"} if isinstance(content, dict) else {}


def read_json(path: str) -> list[Record]:
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    rows = content.get("records") if isinstance(content, dict) else content
    try:
        return [Record(r["dataset"], r["metric"], float(r["mean"]), float(r["std"]), int(r["trials"]),
                       r.get("text_type") or "") for r in rows]
    except (KeyError, TypeError, AttributeError) as error:
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


def text_types_of(records: Sequence[Record]) -> list[str]:
    """The zero-shot text types, in the order they were scored."""
    return list(dict.fromkeys(r.text_type for r in records if r.text_type))


def _lookup(records: Sequence[Record]):
    """(dataset, metric, text type) -> record; a few-shot record answers for every text type."""
    cells = {(r.dataset, r.metric, r.text_type): r for r in records}

    def get(dataset: str, metric: str, text_type: str) -> "Record | None":
        return cells.get((dataset, metric, text_type)) or cells.get((dataset, metric, ""))

    return get


def describe(about: dict) -> list[str]:
    """The lines above the tables: which model, step, templates and data the numbers are of."""
    lines = []
    model = about.get("model") or {}
    if model:
        step = f", step {model['step']}" if model.get("step") is not None else ""
        arch = f" ({model['architecture']})" if model.get("architecture") else ""
        lines.append(f"- model: {model.get('source') or 'random'}{arch}{step}")
    if about.get("text_types"):
        lines.append(f"- zero-shot class names: {', '.join(about['text_types'])} "
                     f"(templates: {about.get('templates', '?')})")
    for data in about.get("datasets", []):
        taxa = f", taxa {data['taxa']}" if data.get("taxa") else ""
        size = f": {data['classes']} classes, {data['images']} images" if "classes" in data else ""
        lines.append(f"- dataset {data['name']}: {data.get('path') or data.get('source')}{taxa}{size}")
    return lines + [""] if lines else []


def class_counts(about: dict | None) -> dict[str, int]:
    """Dataset name -> number of classes, from a results header."""
    return {d["name"]: int(d["classes"]) for d in (about or {}).get("datasets", []) if d.get("classes")}


def title(records: Sequence[Record], about: dict | None) -> str:
    model = (about or {}).get("model") or {}
    of = f" of {model.get('source') or 'random weights'}" if model else ""
    step = f", step {model['step']}" if model.get("step") is not None else ""
    return f"# Evaluation{of}{step} on {', '.join(dict.fromkeys(r.dataset for r in records))}"


def _key(records: Sequence[Record], classes: dict[str, int], ranked: bool, top5_left_out: bool) -> list[str]:
    """How to read the tables: chance, "±", the text types, the mistake distance."""
    lines = []
    if classes:
        chance = "; ".join(f"{100 / n:.2f}% on {name} ({n} classes)" for name, n in classes.items())
        lines.append(f"- accuracies are in % of the images; top-1 chance (a class picked at random) is {chance}")
    trials = max(r.trials for r in records)
    if trials > 1:
        lines.append(f"- a ± b: mean and standard deviation over {trials} few-shot trials (the k training images "
                     f"per class drawn with seeds 0-{trials - 1}); zero-shot draws nothing, so has no ±")
    for text_type in text_types_of(records):
        meaning = TEXT_TYPE_MEANINGS.get(text_type, "")
        lines.append(f"- text type {text_type}: zero-shot classes named by {meaning}, through the prompt templates"
                     if meaning else f"- text type {text_type}")
    if ranked:
        lines.append("- mistake distance: over the wrong predictions, the mean number of ranks from species up to "
                     "the lowest rank the predicted and true species share (1 = same genus, 2 = same family, ..., "
                     "7 = different kingdom); lower is better, 0 when nothing is wrong")
    if top5_left_out:
        lines.append(f"- top-5 is left out: no dataset has more than {TOP5_MIN_CLASSES - 1} classes "
                     f"(results.json has it)")
    return ["How to read this:", *lines] if lines else []


def markdown_table(records: Sequence[Record], about: dict | None = None) -> str:
    """Headline metrics (one row per dataset and zero-shot text type) and, when classes had a taxonomy,
    accuracy per rank (one row per dataset and method) with the mean mistake distance in ranks."""
    if not records:
        return "(no results)\n"
    datasets = list(dict.fromkeys(r.dataset for r in records))
    classes = class_counts(about)
    get = _lookup(records)
    types = text_types_of(records) or [""]
    type_column = ["text type"] if types != [""] else []
    headline = sorted({r.metric for r in records if split_metric(r.metric)[1] == ""}, key=_method_order)
    top5_left_out = ("zero_shot_top5" in headline and all(d in classes for d in datasets)
                     and max(classes[d] for d in datasets) < TOP5_MIN_CLASSES)
    headline = [m for m in headline if not (top5_left_out and m == "zero_shot_top5")]
    rows = [[d, *([t] if type_column else []), *(_cell(get(d, m, t)) for m in headline)]
            for d in datasets for t in types]
    lines = [title(records, about), ""] + describe(about or {}) + _table(["dataset", *type_column, *headline], rows)
    if type_column and any(not split_metric(m)[0].startswith("zero") for m in headline):
        lines += ["", "(few-shot uses image features only: the same on every text type's row)"]
    ranked = sorted({split_metric(r.metric)[0] for r in records if split_metric(r.metric)[1]}, key=_method_order)
    if ranked:
        columns = ["species", *_RANK_SUFFIXES, "mistake distance"]
        rows = []
        for dataset in datasets:
            for method in ranked:
                names = [method, *(f"{method}_{rank}" for rank in _RANK_SUFFIXES),
                         method.replace("_top1", "_mistake_distance")]
                for text_type in (types if method.startswith("zero") else [""]):
                    found = [get(dataset, n, text_type) for n in names]
                    if any(found):
                        label = [text_type or "-"] if type_column else []
                        rows.append([dataset, method, *label, *(_cell(r) for r in found)])
        lines += ["", "Accuracy per rank (a species prediction scored at each rank):", ""]
        lines += _table(["dataset", "method", *type_column, *columns], rows)
    lines += ["", *_key(records, {d: classes[d] for d in datasets if d in classes}, bool(ranked), top5_left_out)]
    return "\n".join(lines) + "\n"
