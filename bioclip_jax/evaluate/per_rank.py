"""Scoring species predictions up the tree: accuracy per rank and how far mistakes land.

A prediction of the wrong species in the right genus is still right at genus, family,
... kingdom. The taxonomic distance of a mistake is the number of ranks between species
and the lowest common ancestor: 1 = same genus, 2 = same family, ..., 7 = different
kingdom. A hierarchical embedding makes near misses, so its mean distance is small.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bioclip_jax.taxonomy import RANKS, Taxon


def lineage_codes(taxa: Sequence[Taxon]) -> np.ndarray:
    """[C, 7] ints: equal at rank r exactly when two classes share their lineage down to r."""
    codes = np.zeros((len(taxa), len(RANKS)), np.int64)
    for r, rank in enumerate(RANKS):
        ids: dict[tuple[str, ...], int] = {}
        for c, taxon in enumerate(taxa):
            codes[c, r] = ids.setdefault(taxon.lineage(rank), len(ids))
    return codes


def shared_depth(codes: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """How many leading ranks (0..7) each predicted class shares with the true one."""
    same = codes[predicted] == codes[true]  # [N, 7], monotone: once different, different below
    return same.sum(axis=1)


def per_rank_accuracy(codes: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """Accuracy at each rank, kingdom .. species, of class-level predictions."""
    depth = shared_depth(codes, np.asarray(predicted), np.asarray(true))
    return {rank: float((depth > r).mean()) for r, rank in enumerate(RANKS)}


def mistake_distance(codes: np.ndarray, predicted: np.ndarray, true: np.ndarray) -> float:
    """Mean ranks from species to the lowest common ancestor over wrong predictions (0.0 if none)."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    wrong = predicted != true
    if not wrong.any():
        return 0.0
    return float((len(RANKS) - shared_depth(codes, predicted[wrong], true[wrong])).mean())
