"""The open-set answer on a hand-made tree whose probabilities are known: the deepest rank it is sure of."""

import types

import numpy as np
import pytest

from bioclip_jax.classify.labels import rank_groups, tree_of_life_labels
from bioclip_jax.classify.open_set import OpenSetPredictor, taxon_tree
from bioclip_jax.classify.scoring import Predictor
from bioclip_jax.taxonomy import RANKS, Taxon

BIRDS = dict(kingdom="Animalia", phylum="Chordata", **{"class": "Aves"}, order="Passeriformes")
TAXA = [
    Taxon.from_ranks(**BIRDS, family="Corvidae", genus="Corvus", species="corax", common="common raven"),
    Taxon.from_ranks(**BIRDS, family="Corvidae", genus="Corvus", species="frugilegus", common="rook"),
    Taxon.from_ranks(**BIRDS, family="Corvidae", genus="Pica", species="pica", common="Eurasian magpie"),
    Taxon.from_ranks(**BIRDS, family="Passeridae", genus="Passer", species="domesticus", common="house sparrow"),
    Taxon.from_ranks(kingdom="Animalia", phylum="Chordata", **{"class": "Mammalia"}, order="Carnivora",
                     family="Canidae", genus="Vulpes", species="vulpes", common="red fox"),
    Taxon.from_ranks(kingdom="Plantae", phylum="Tracheophyta", **{"class": "Magnoliopsida"}, order="Rosales",
                     family="Rosaceae", genus="Rosa", species="canina", common="dog rose"),
    Taxon.from_ranks(**BIRDS, family="Corvidae"),  # a catalog entry known only down to its family
]
SPECIES_FEATURES = np.eye(len(TAXA), len(TAXA) + 1, dtype=np.float32)  # species i along axis i
SCALE = 100.0
MODEL = types.SimpleNamespace(logit_scale=np.asarray(np.log(SCALE), np.float32))  # all a predictor reads


def image_with(probs) -> np.ndarray:
    """A unit image feature whose softmax(SCALE * cosine) over SPECIES_FEATURES is `probs`."""
    probs = np.asarray(probs, np.float64)
    assert probs.sum() == pytest.approx(1.0)
    cosines = np.log(np.maximum(probs, 1e-12)) / SCALE + 0.3
    return np.append(cosines, np.sqrt(1.0 - np.sum(cosines ** 2))).astype(np.float32)


CONFIDENT_RAVEN = [0.9, 0.02, 0.02, 0.02, 0.02, 0.02, 0.0]
RAVEN_OR_ROOK = [0.45, 0.45, 0.02, 0.03, 0.03, 0.02, 0.0]
SOME_CROW = [0.3, 0.2, 0.35, 0.05, 0.05, 0.05, 0.0]
BIRD_OR_ROSE = [0.2, 0.1, 0.05, 0.05, 0.1, 0.5, 0.0]
FAMILY_ONLY = [0.05, 0.03, 0.02, 0.02, 0.02, 0.01, 0.85]
SPREAD_ANIMALS = [0.12, 0.12, 0.12, 0.12, 0.12, 0.4, 0.0]  # Animalia 0.6 spread out, Plantae 0.4 on one rose


def answers(images, confidence=0.8, min_prob=1e-9, batch_size=8):
    predictor = OpenSetPredictor(MODEL, SPECIES_FEATURES, TAXA, confidence, min_prob, batch_size)
    keys = [f"image{i}" for i in range(len(images))]
    return predictor.rows(keys, np.stack([image_with(p) for p in images]))


def test_the_deepest_rank_it_is_sure_of():
    raven, genus, family, unsure, family_only = answers(
        [CONFIDENT_RAVEN, RAVEN_OR_ROOK, SOME_CROW, BIRD_OR_ROSE, FAMILY_ONLY])
    assert list(raven) == ["file_name", "kingdom", "phylum", "class", "order", "family", "genus",
                           "species_epithet", "species", "common_name", "score", "rank"]
    assert raven["file_name"] == "image0"
    assert (raven["rank"], raven["species"], raven["common_name"], raven["genus"]) == \
        ("species", "Corvus corax", "common raven", "Corvus")
    assert raven["score"] == pytest.approx(0.9, abs=1e-5)
    assert (genus["rank"], genus["genus"], genus["family"]) == ("genus", "Corvus", "Corvidae")
    assert genus["species_epithet"] == genus["species"] == genus["common_name"] == ""
    assert genus["score"] == pytest.approx(0.9, abs=1e-5)  # two siblings at 0.45 each
    assert (family["rank"], family["family"], family["genus"], family["species"]) == \
        ("family", "Corvidae", "", "")
    assert family["score"] == pytest.approx(0.85, abs=1e-5)
    assert unsure["rank"] == "" and all(unsure[c] == "" for c in ("kingdom", "phylum", "genus", "species"))
    assert unsure["score"] == pytest.approx(0.5, abs=1e-5)  # the best kingdom's probability
    # the family-only entry holds 0.85 of a genus with no name: that is no answer at genus
    assert (family_only["rank"], family_only["family"], family_only["genus"]) == ("family", "Corvidae", "")
    assert family_only["score"] == pytest.approx(0.95, abs=1e-5)


def test_confidence_moves_the_answer_up_and_down_the_tree():
    def rank_at(confidence):
        return answers([SOME_CROW], confidence)[0]["rank"]

    # Corvus corax 0.3 (under Corvus 0.5; Pica pica's 0.35 is not), Corvidae 0.85, Passeriformes 0.9, Animalia 0.95
    assert [rank_at(p) for p in (0.29, 0.49, 0.84, 0.86, 0.93, 0.96)] == \
        ["species", "genus", "family", "order", "phylum", ""]


def test_below_one_half_the_answer_stays_under_the_surer_taxon_above():
    """P = 0.3: the rose (0.4) is the most probable species, but Animalia (0.6) is the surer kingdom;
    the answer descends from Animalia through the best child at each rank and stops at Corvidae (0.36),
    whose best genus (Corvus, 0.24) is below P."""
    (answer,) = answers([SPREAD_ANIMALS], confidence=0.3)
    assert (answer["rank"], answer["kingdom"], answer["family"]) == ("family", "Animalia", "Corvidae")
    assert answer["score"] == pytest.approx(0.36, abs=1e-5)


@pytest.mark.parametrize("min_prob", [1e-9, 0.03])
def test_summed_probability_is_the_fixed_rank_top_score(min_prob):
    """At every rank the open-set sum is the fixed-rank predictor's top-1 score, with the same min_prob
    (for images whose best taxon at each rank lies under the best one above, as it must for P > 0.5)."""
    mostly_raven = [0.35, 0.25, 0.1, 0.1, 0.1, 0.1, 0.0]
    images = np.stack([image_with(p) for p in (CONFIDENT_RAVEN, RAVEN_OR_ROOK, mostly_raven)])
    open_set = OpenSetPredictor(MODEL, SPECIES_FEATURES, TAXA, 0.8, min_prob, batch_size=4)
    _, sums = open_set.rank_scores(images)
    for depth, rank in enumerate(RANKS):
        fixed = Predictor(MODEL, tree_of_life_labels(SPECIES_FEATURES, TAXA, rank, min_prob), 1, batch_size=4)
        top = [row["score"] for row in fixed.rows(["a", "b", "c"], images)]
        np.testing.assert_allclose(sums[:, depth], top, atol=1e-6, err_msg=rank)
    assert sums[0, 0] == pytest.approx(0.9 if min_prob == 0.03 else 0.98, abs=1e-5)  # 0.02s zeroed or not


def test_one_pass_tree_is_rank_groups_at_every_rank():
    taxa = TAXA + [Taxon.from_ranks(kingdom="Animalia", phylum="Chordata"), TAXA[0]]  # a gap, and a repeat
    group_ids, parent_ids, representatives = taxon_tree(taxa)
    for depth, rank in enumerate(RANKS):
        ids, firsts = rank_groups(taxa, rank)
        assert group_ids[depth] == ids.tolist() and representatives[depth] == firsts, rank
        above = group_ids[depth - 1] if depth else [0] * len(taxa)
        assert [parent_ids[depth][group] for group in ids] == above, rank


def test_confidence_outside_zero_to_one_is_refused():
    for confidence in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"confidence must be a probability in \(0, 1\]"):
            OpenSetPredictor(MODEL, SPECIES_FEATURES, TAXA, confidence)
