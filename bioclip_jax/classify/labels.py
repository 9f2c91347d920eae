"""What images are scored against: custom labels, bins of labels, or tree-of-life taxa grouped at a rank.

Custom labels are embedded as pybioclip's CustomLabelsClassifier does (80 OpenAI templates,
normalised mean). Tree-of-life labels are species embeddings (an embed-taxa or pybioclip
folder, a catalog embedded once and cached, or the dataset repo pybioclip pairs with the
model); a higher rank sums the probabilities of its species above `min_prob`, as pybioclip does.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from typing import Sequence

import numpy as np

from bioclip_jax import hub, taxa_embeddings
from bioclip_jax.inference import TextEmbedder
from bioclip_jax.models.clip import CLIP
from bioclip_jax.paths import as_path, open_text
from bioclip_jax.taxonomy import RANKS, Taxon

log = logging.getLogger(__name__)

DEFAULT_MIN_PROB = 1e-9  # pybioclip's: species probabilities at or below it are not summed into a rank


@dataclasses.dataclass
class Labels:
    """[C, D] class embeddings, C -> reported group, and each group's output fields (in column order)."""

    features: np.ndarray
    group_ids: np.ndarray  # class -> reported group (identity unless summing species to a rank)
    groups: list[dict]
    min_prob: float = 0.0  # class probabilities at or below this are not summed into a group


def unique_labels(names: Sequence[str], where: str) -> list[str]:
    """Each label once, stripped: a repeated label would split its probability and rank a wrong one first."""
    names = [n.strip() for n in names if n.strip()]
    counts = {n: names.count(n) for n in dict.fromkeys(names)}
    repeated = [f"{n!r} ({c} times)" for n, c in counts.items() if c > 1]
    if repeated:
        log.warning("%s repeats %s; each label is scored once", where, ", ".join(repeated))
    return list(counts)


def custom_labels(model: CLIP, names: Sequence[str], batch_size: int = 256) -> Labels:
    classes = [n.strip() for n in names]
    features = TextEmbedder(model, batch_size=batch_size).classes(classes)
    return Labels(features, np.arange(len(classes)), [{"classification": c} for c in classes])


def binned_labels(model: CLIP, class_to_bin: dict[str, str], batch_size: int = 256) -> Labels:
    """pybioclip's bins: each class is scored, and a bin's score is the sum over its classes."""
    classes = list(class_to_bin)
    bins = list(dict.fromkeys(class_to_bin.values()))
    features = TextEmbedder(model, batch_size=batch_size).classes(classes)
    group_ids = np.asarray([bins.index(class_to_bin[c]) for c in classes])
    return Labels(features, group_ids, [{"classification": b} for b in bins])


def read_bins(path: str) -> dict[str, str]:
    """class -> bin from pybioclip's bins CSV (header row; first column the class, second its bin)."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"bins file not found: {path}")
    with open_text(path) as handle:
        rows = [r for r in csv.reader(handle) if any(c.strip() for c in r)]
    if not rows or len(rows[0]) < 2:
        raise ValueError(f"{path} must have a header and two columns: class, bin")
    mapping: dict[str, str] = {}
    for number, row in enumerate(rows[1:], start=2):
        name, bin_name = (row + ["", ""])[0].strip(), (row + ["", ""])[1].strip()
        if not name or not bin_name:
            raise ValueError(f"{path} line {number}: empty class or bin (both are required)")
        if mapping.get(name, bin_name) != bin_name:
            raise ValueError(f"{path} line {number}: class {name!r} is put in two bins, "
                             f"{mapping[name]!r} and {bin_name!r}")
        mapping[name] = bin_name
    if not mapping:
        raise ValueError(f"{path} lists no classes")
    return mapping


def rank_fields(taxon: Taxon, rank: str) -> dict:
    """pybioclip's columns: kingdom .. rank, and for species also the epithet and common name."""
    ranks = taxon.ranks_tuple()
    depth = RANKS.index(rank) + 1
    fields = dict(zip(RANKS[: min(depth, 6)], ranks[: min(depth, 6)]))
    if rank == "species":
        fields.update(species_epithet=taxon.species, species=f"{taxon.genus} {taxon.species}",
                      common_name=taxon.common)
    return fields


def rank_groups(taxa: Sequence[Taxon], rank: str) -> tuple[np.ndarray, list[Taxon]]:
    """(taxon -> group at `rank`, one representative taxon per group), groups in first-seen order."""
    ids: dict[tuple, int] = {}
    representatives: list[Taxon] = []
    group_ids = np.zeros(len(taxa), np.int32)
    for i, taxon in enumerate(taxa):
        lineage = taxon.lineage(rank)
        if lineage not in ids:
            ids[lineage] = len(representatives)
            representatives.append(taxon)
        group_ids[i] = ids[lineage]
    return group_ids, representatives


def tree_of_life_labels(features: np.ndarray, taxa: Sequence[Taxon], rank: str,
                        min_prob: float = DEFAULT_MIN_PROB) -> Labels:
    """Species embeddings grouped by their lineage down to `rank`."""
    if rank == "species":
        return Labels(features, np.arange(len(taxa)), [rank_fields(t, rank) for t in taxa])
    group_ids, representatives = rank_groups(taxa, rank)
    return Labels(features, group_ids, [rank_fields(t, rank) for t in representatives], min_prob)


def read_subset(path: str) -> tuple[str, set[str]]:
    """(rank, values) from a CSV (local or gs://) whose first column is named by a rank, as pybioclip's --subset."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"subset file not found: {path}")
    with open_text(path) as handle:
        rows = list(csv.reader(handle))
    if not rows or not rows[0]:
        raise ValueError(f"{path} is empty; its first column must be named one of {', '.join(RANKS)}")
    rank = rows[0][0].strip().lower()
    if rank not in RANKS:
        raise ValueError(f"the first column of {path} is named {rows[0][0]!r} but must be one of {', '.join(RANKS)}")
    return rank, {" ".join(r[0].split()).lower() for r in rows[1:] if r and r[0].strip()}


def subset_mask(taxa: Sequence[Taxon], rank: str, values: set[str], where: str) -> np.ndarray:
    """Which taxa match; every listed value must name at least one taxon."""
    def value(taxon: Taxon) -> str:
        return (taxon.scientific_name if rank == "species" else taxon.lineage(rank)[-1]).lower()

    names = [value(t) for t in taxa]
    unknown = sorted(values - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown {rank} {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else "")
                         + f"; only {rank} present in the taxa embeddings may be used")
    return np.asarray([n in values for n in names])


def load_tree_of_life(model: CLIP, *, taxa_embeddings_dir: str | None = None, taxa_catalog: str | None = None,
                      text_type: str = "taxon_com", subset: str | None = None,
                      progress: bool = False) -> tuple[np.ndarray, list[Taxon]]:
    """[N, D] species embeddings and their taxa: `taxa_embeddings_dir`, else `taxa_catalog` (embedded
    once and cached), else the tree-of-life dataset repo pybioclip pairs with the model; `subset`
    (pybioclip's CSV) keeps only the taxa it lists."""
    directory = taxa_embeddings_dir
    if not directory and taxa_catalog:
        directory = taxa_embeddings.cached_taxa_folder(model, taxa_catalog, text_type)
        if not taxa_embeddings.has_taxa_embeddings(directory):
            log.info("embedding the taxa of %s once; kept in %s", taxa_catalog, directory)
    if not directory and hub.tree_of_life_repo(model.source):
        directory = hub.tree_of_life_folder(hub.tree_of_life_repo(model.source))
    have_files = taxa_embeddings.has_taxa_embeddings(directory)
    if not have_files and not taxa_catalog:
        raise ValueError("tree-of-life prediction needs --taxa-embeddings DIR (from `bioclip-jax embed-taxa`) "
                         f"or --taxa CSV with this model (only {' and '.join(hub.TREE_OF_LIFE)} come with "
                         "embeddings); for your own labels pass --cls")
    if not have_files:
        taxa, _ = taxa_embeddings.read_catalog_taxa(taxa_catalog)
        taxa_embeddings.write_taxa_embeddings(model, taxa, directory, text_type, progress=progress)
    matrix, taxa = taxa_embeddings.load_taxa_embeddings(directory)
    features = np.ascontiguousarray(np.asarray(matrix, np.float32).T)
    if features.shape[1] != model.config.embed_dim:
        raise ValueError(f"taxa embeddings have dimension {features.shape[1]} but the model embeds into "
                         f"{model.config.embed_dim}; they were made with another model")
    if subset:
        subset_rank, values = read_subset(subset)
        keep = subset_mask(taxa, subset_rank, values, subset)
        features, taxa = features[keep], [t for t, k in zip(taxa, keep) if k]
    return features, taxa
