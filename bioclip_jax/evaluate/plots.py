"""PNG figures: our accuracies beside the published ones, and a 2-D map of image embeddings."""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bioclip_jax.evaluate.results import Record  # noqa: E402

# Zero-shot top-1 (%) reported by the BioCLIP authors (CVPR 2024, table 4).
_TASKS = ("birds525", "plankton", "insects", "insects2", "plantnet", "fungi", "plantvillage",
          "medicinal_leaf", "plantdoc", "rare_species")
PUBLISHED: dict[str, dict[str, dict[str, float]]] = {
    "zero_shot_top1": {
        model: dict(zip(_TASKS, values)) for model, values in {
            "CLIP": (49.9, 3.2, 9.1, 9.8, 58.5, 10.2, 5.4, 15.9, 26.1, 26.6),
            "OpenCLIP": (54.7, 2.2, 6.5, 9.6, 50.2, 5.7, 8.0, 12.4, 25.8, 31.0),
            "BioCLIP": (72.1, 6.1, 34.8, 20.4, 91.4, 40.7, 24.4, 38.6, 28.4, 37.8),
        }.items()
    },
    "1_shot_top1": {"CLIP": {"rare_species": 28.5}, "BioCLIP": {"rare_species": 44.9}},
    "5_shot_top1": {"CLIP": {"rare_species": 46.1}, "BioCLIP": {"rare_species": 65.7}},
}

# Names people give these datasets, mapped to the keys above.
_ALIASES = {"birds": "birds525", "birds_525": "birds525", "plk": "plankton", "ins": "insects",
            "ins2": "insects2", "insects_2": "insects2", "plant_net": "plantnet", "plt_net": "plantnet",
            "fng": "fungi", "plant_village": "plantvillage", "plt_vil": "plantvillage",
            "medleaf": "medicinal_leaf", "med_lf": "medicinal_leaf", "plant_doc": "plantdoc",
            "plt_doc": "plantdoc", "rare": "rare_species", "rarespecies": "rare_species"}


def published_key(dataset: str) -> str | None:
    """The published-task key for a dataset name ("Birds 525", "plant_village:train", ...)."""
    base = dataset.split(":")[0].lower().replace("-", "_").replace(" ", "_")
    base = _ALIASES.get(base, base)
    return base if base in _TASKS else None


HEADLINE_METRICS = ("zero_shot_top1", "1_shot_top1", "5_shot_top1")
_COLOURS = {"ours": "C0", "CLIP": "C1", "OpenCLIP": "C2", "BioCLIP": "C3"}  # the same in every panel


def _bars(ax, records: Sequence[Record], metric: str) -> None:
    """Grouped bars per dataset: ours, then each published model that has a number there."""
    ours = [r for r in records if r.metric == metric]
    series = {"ours": [r.mean for r in ours]}
    errors = [r.std for r in ours]
    for model, table in PUBLISHED.get(metric, {}).items():
        series[model] = [table.get(published_key(r.dataset) or "", np.nan) for r in ours]
    series = {name: values for name, values in series.items() if not np.all(np.isnan(values))}
    width = min(0.8 / len(series), 0.3)
    x = np.arange(len(ours))
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, np.nan_to_num(values), width, label=name,
               color=_COLOURS.get(name), yerr=errors if name == "ours" and any(errors) else None, capsize=2)
    ax.set_xticks(x, [r.dataset for r in ours], rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(metric)
    ax.legend(fontsize="small")


def comparison_chart(records: Sequence[Record], path: str, metrics: Sequence[str] = HEADLINE_METRICS) -> bool:
    """One panel per headline metric we have, our bars beside the published ones (BioCLIP paper)."""
    present = [m for m in metrics if any(r.metric == m for r in records)]
    if not present:
        return False
    datasets = len({r.dataset for r in records})
    fig, axes = plt.subplots(1, len(present), figsize=(len(present) * max(4.5, 1.0 * datasets + 2), 4.2),
                             squeeze=False)
    for ax, metric in zip(axes[0], present):
        _bars(ax, records, metric)
    fig.suptitle("ours vs published (BioCLIP, CVPR 2024)")
    fig.tight_layout()
    _save(fig, path)
    return True


def pca_2d(features: np.ndarray) -> np.ndarray:
    """The first two principal components (SVD of the centred features)."""
    centred = features - features.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    points = centred @ vt[:2].T
    return np.pad(points, ((0, 0), (0, 2 - points.shape[1])))  # fewer than 2 components: zeros


def embedding_plot(features: np.ndarray, groups: Sequence[str], path: str, title: str,
                   max_points: int = 20000, seed: int = 0) -> None:
    """A 2-D PCA scatter coloured by group (e.g. each image's family); legend when it fits."""
    groups = np.asarray(groups)
    if len(features) > max_points:
        keep = np.random.default_rng(seed).choice(len(features), max_points, replace=False)
        features, groups = features[keep], groups[keep]
    points = pca_2d(np.asarray(features, np.float64))
    names = sorted(set(groups.tolist()))
    cmap = plt.get_cmap("tab20" if len(names) <= 20 else "hsv", max(len(names), 1))
    fig, ax = plt.subplots(figsize=(7.0, 6.0))
    for i, name in enumerate(names):
        mask = groups == name
        ax.scatter(points[mask, 0], points[mask, 1], s=8, color=cmap(i), label=name or "(missing)")
    if len(names) <= 20:
        ax.legend(fontsize="x-small", markerscale=2, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
