"""The open-set answer: for each image, the deepest rank of the tree of life it is sure of.

A camera-trap frame at night may not show which crow it is, yet be plainly a crow: rather
than a wrong species at 0.3, say "family Corvidae 0.93". Species probabilities (softmax over
the species embeddings, those at or below `min_prob` zeroed, as for a fixed rank) are summed
per taxon at every rank, kingdom .. species, on the device; the answer is the deepest rank
whose summed probability reaches the confidence P, with that taxon and that sum.

Which taxon, at each rank: the best one among the children of the taxon answered at the rank
above (starting with the best kingdom), and the descent stops at the first rank whose best child
is below P. For P > 0.5 at most one taxon per rank can reach P and it lies under the one above,
so this is simply the deepest rank whose best taxon reaches P. For P <= 0.5 several taxa of a
rank may reach P, and the best of them need not lie under the best taxon above (Animalia 0.6
split among many birds, Plantae 0.4 all on one rose, P = 0.3: the best species is the rose):
the answer is always one lineage, each taxon the most probable under its parent, so it never
contradicts a surer answer at a higher rank. A taxon whose name at a rank is empty (a catalog
entry known only down to its family, say) is never the answer at that rank: the descent stops.
"""

from __future__ import annotations

import copy
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bioclip_jax.classify.labels import DEFAULT_MIN_PROB, rank_fields
from bioclip_jax.classify.scoring import logit_scale
from bioclip_jax.models.clip import CLIP
from bioclip_jax.taxonomy import RANKS, Taxon

DEFAULT_CONFIDENCE = 0.8
# pybioclip's species columns, then the rank answered
COLUMNS = ("kingdom", "phylum", "class", "order", "family", "genus", "species_epithet", "species", "common_name")


@functools.partial(jax.jit, static_argnums=(6,))
def _descend(image_features, species_features, scale, min_prob, group_ids, parent_ids, group_counts, named):
    """([B, R] group chosen at each rank, [B, R] its summed probability), R = len(RANKS).

    group_ids[r]: species -> group at rank r; parent_ids[r]: group at rank r -> its group at r - 1
    (all 0 for the kingdom, whose parent is the root); named[r]: whether a group has a name at r.
    """
    probs = jax.nn.softmax(scale * image_features @ species_features.T, axis=-1)
    probs = jnp.where(probs > min_prob, probs, 0.0)
    chosen = jnp.zeros(probs.shape[0], jnp.int32)
    choices, scores = [], []
    for ids, parents, count, has_name in zip(group_ids, parent_ids, group_counts, named):
        summed = jax.ops.segment_sum(probs.T, ids, num_segments=count).T  # [B, groups at this rank]
        allowed = (parents[None, :] == chosen[:, None]) & has_name[None, :]
        chosen = jnp.argmax(jnp.where(allowed, summed, -1.0), axis=-1).astype(jnp.int32)
        choices.append(chosen)
        scores.append(jnp.where(jnp.take_along_axis(allowed, chosen[:, None], 1)[:, 0],
                                jnp.take_along_axis(summed, chosen[:, None], 1)[:, 0], 0.0))
    return jnp.stack(choices, axis=1), jnp.stack(scores, axis=1)


def taxon_tree(taxa: Sequence[Taxon]) -> tuple[list[list[int]], list[list[int]], list[list[Taxon]]]:
    """Per rank: species -> group, group -> its group at the rank above (0 for a kingdom), and one
    taxon per group. Groups are numbered in first-seen order, as labels.rank_groups numbers them, in
    one pass over the tree (a group is its parent group and its name) rather than one per rank."""
    group_ids: list[list[int]] = [[] for _ in RANKS]
    parent_ids: list[list[int]] = [[] for _ in RANKS]
    representatives: list[list[Taxon]] = [[] for _ in RANKS]
    index: list[dict[tuple[int, str], int]] = [{} for _ in RANKS]
    for taxon in taxa:
        parent = 0
        for depth, name in enumerate(taxon.ranks_tuple()):
            group = index[depth].setdefault((parent, name), len(representatives[depth]))
            if group == len(representatives[depth]):
                representatives[depth].append(taxon)
                parent_ids[depth].append(parent)
            group_ids[depth].append(group)
            parent = group
    return group_ids, parent_ids, representatives


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence <= 1.0:
        raise ValueError(f"confidence must be a probability in (0, 1], got {confidence}")


class OpenSetPredictor:
    """One row per image: the deepest rank whose summed probability reaches `confidence` (see the
    module docstring); batches are padded to `batch_size` so that one shape compiles."""

    def __init__(self, model: CLIP, features: np.ndarray, taxa: Sequence[Taxon],
                 confidence: float = DEFAULT_CONFIDENCE, min_prob: float = DEFAULT_MIN_PROB, batch_size: int = 32):
        _check_confidence(confidence)
        if len(taxa) != len(features):
            raise ValueError(f"{len(features)} species embeddings but {len(taxa)} taxa")
        self.confidence, self.min_prob, self.batch_size = confidence, min_prob, batch_size
        self._species = jnp.asarray(features, jnp.float32)
        self._scale = logit_scale(model)
        group_ids, parent_ids, self._representatives = taxon_tree(taxa)
        self._group_ids = tuple(jnp.asarray(np.asarray(ids, np.int32)) for ids in group_ids)
        self._parent_ids = tuple(jnp.asarray(np.asarray(parents, np.int32)) for parents in parent_ids)
        self._named = tuple(jnp.asarray(np.asarray([bool(t.ranks_tuple()[depth]) for t in representatives]))
                            for depth, representatives in enumerate(self._representatives))
        self._group_counts = tuple(len(r) for r in self._representatives)

    rows_per_image = 1

    def with_settings(self, confidence: float, min_prob: float) -> "OpenSetPredictor":
        """The same tree and species for another confidence or min_prob: neither changes the tree,
        and grouping a large tree's species by rank is slow."""
        _check_confidence(confidence)
        other = copy.copy(self)
        other.confidence, other.min_prob = confidence, min_prob
        return other

    def rank_scores(self, image_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([n, R] group chosen at each rank, [n, R] its summed probability) for n <= batch_size images."""
        padded = np.zeros((self.batch_size, image_features.shape[1]), np.float32)
        padded[: len(image_features)] = image_features
        choices, scores = _descend(jnp.asarray(padded), self._species, self._scale, self.min_prob,
                                   self._group_ids, self._parent_ids, self._group_counts, self._named)
        n = len(image_features)
        return np.asarray(choices)[:n], np.asarray(scores)[:n]

    def rows(self, keys: Sequence[str], image_features: np.ndarray) -> list[dict]:
        choices, scores = self.rank_scores(image_features)
        sure = np.cumprod(scores >= self.confidence, axis=1)  # the descent stops at the first rank below P
        out = []
        for key, image_choices, image_scores, image_sure in zip(keys, choices, scores, sure):
            depth = int(image_sure.sum())  # ranks answered: 0 = not even the kingdom reaches P
            row = {"file_name": key, **dict.fromkeys(COLUMNS, "")}
            if depth:
                rank = RANKS[depth - 1]
                row.update(rank_fields(self._representatives[depth - 1][image_choices[depth - 1]], rank))
                row.update(score=float(image_scores[depth - 1]), rank=rank)
            else:
                row.update(score=float(image_scores[0]), rank="")
            out.append(row)
        return out
