"""PNG figures: our accuracies beside the published ones, and a 2-D map of image embeddings.

The bar chart has a title, one legend below the panels (so it never covers a bar or its label),
error bars (std over trials) where several trials were run, and each dataset's chance level.
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt
import numpy as np

from bioclip_jax.evaluate.results import Record

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
_COLOURS = {"CLIP": "C1", "OpenCLIP": "C2", "BioCLIP": "C3"}  # the same in every panel
_OURS_COLOURS = ("C0", "C4", "C9", "C5", "C6", "C8")  # ours, one shade per zero-shot text type


CHANCE_LABEL = "chance (1 / classes)"


def _series(records: Sequence[Record], metric: str, datasets: list[str]) -> dict[str, tuple[list, list]]:
    """(bar heights, std) per dataset: ours (per text type for zero-shot), then each published model with a
    number for at least one of these datasets (NaN where it has none: no bar is drawn there). The std is
    NaN for a single trial and for published numbers: no error bar."""
    series: dict[str, tuple[list, list]] = {}
    ours = [r for r in records if r.metric == metric]
    for text_type in dict.fromkeys(r.text_type for r in ours):
        cells = {r.dataset: r for r in ours if r.text_type == text_type}
        found = [cells.get(d) for d in datasets]
        series[f"ours ({text_type})" if text_type else "ours"] = (
            [r.mean if r else np.nan for r in found], [r.std if r and r.trials > 1 else np.nan for r in found])
    for model, table in PUBLISHED.get(metric, {}).items():
        values = [table.get(published_key(d) or "", np.nan) for d in datasets]
        if not np.all(np.isnan(values)):
            series[model] = (values, [np.nan] * len(datasets))
    return series


def _bars(ax, records: Sequence[Record], metric: str, classes: dict[str, int]) -> bool:
    """Grouped bars per dataset, each labelled with its value (above its error bar), and each dataset's
    chance level as a dashed line across its group; True when a published bar is drawn."""
    datasets = list(dict.fromkeys(r.dataset for r in records if r.metric == metric))
    series = _series(records, metric, datasets)
    width = min(0.8 / len(series), 0.3)
    x = np.arange(len(datasets))
    ours_colours = iter(_OURS_COLOURS)
    for i, (name, (values, stds)) in enumerate(series.items()):
        values, stds = np.asarray(values, np.float64), np.asarray(stds, np.float64)
        shown = ~np.isnan(values)
        colour = _COLOURS.get(name) or next(ours_colours, None)
        errors = np.nan_to_num(stds[shown])
        centres = (x + (i - (len(series) - 1) / 2) * width)[shown]
        ax.bar(centres, values[shown], width, label=name, color=colour,
               yerr=errors if errors.any() else None, capsize=3, error_kw={"elinewidth": 1})
        for centre, value, error in zip(centres, values[shown], errors):
            ax.annotate(f"{value:.1f}", (centre, value + error), xytext=(0, 1), textcoords="offset points",
                        ha="center", va="bottom", fontsize="x-small")
    chance = [(i, 100.0 / classes[d]) for i, d in enumerate(datasets) if classes.get(d)]
    if chance:
        ax.hlines([level for _, level in chance], [i - 0.45 for i, _ in chance], [i + 0.45 for i, _ in chance],
                  colors="0.3", linestyles="--", linewidth=1, label=CHANCE_LABEL, zorder=3)
    ax.set_xticks(x, datasets, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(datasets) - 0.4)  # one dataset: bars keep their width instead of filling the panel
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 108)
    ax.set_title(metric)
    return any(name in PUBLISHED.get(metric, {}) for name in series)


def comparison_chart(records: Sequence[Record], path: str, metrics: Sequence[str] = HEADLINE_METRICS,
                     classes: dict[str, int] | None = None) -> bool:
    """One panel per headline metric we have; published numbers (BioCLIP paper) beside ours only on the
    datasets the paper reports, and the title mentions them only when some are drawn. `classes`
    (dataset -> number of classes) draws the chance levels."""
    present = [m for m in metrics if any(r.metric == m for r in records)]
    if not present:
        return False
    datasets = len({r.dataset for r in records})
    bars = max(len({r.text_type for r in records if r.metric == m}) for m in present) + 3
    fig, axes = plt.subplots(1, len(present), squeeze=False, layout="constrained",
                             figsize=(len(present) * max(4.5, 0.35 * bars * datasets + 2), 4.8))
    published = [_bars(ax, records, metric, classes or {}) for ax, metric in zip(axes[0], present)]
    names = ", ".join(dict.fromkeys(r.dataset for r in records))
    trials = max(r.trials for r in records if r.metric in present)
    fig.suptitle(f"top-1 accuracy on {names}" + (" beside the published numbers (BioCLIP, CVPR 2024)"
                                                  if any(published) else "")
                 + (f"; error bars: std over {trials} trials" if trials > 1 else ""))
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if CHANCE_LABEL in legend:
        legend[CHANCE_LABEL] = legend.pop(CHANCE_LABEL)  # last, after the bars
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(len(legend), 4),
               fontsize="small")
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
