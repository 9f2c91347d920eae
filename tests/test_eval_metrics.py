"""Evaluation metrics on hand-made embeddings with known answers (no model involved)."""

import json

import numpy as np
import pytest

from bioclip_jax.evaluate import few_shot, per_rank, plots, results, zero_shot
from bioclip_jax.taxonomy import Taxon, templates


def _clusters(num_classes=4, per_class=8, dim=16, noise=0.05, seed=0):
    """Points near distinct random unit directions; labels 0..C-1."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    features = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return features.astype(np.float32), labels


# ---- few-shot ------------------------------------------------------------------------------------


def test_cl2n_matches_direct_numpy():
    rng = np.random.default_rng(1)
    support, query = rng.normal(size=(6, 5)), rng.normal(size=(3, 5))
    normed = support / np.linalg.norm(support, axis=1, keepdims=True)
    mean = normed.mean(axis=0)
    expected = query / np.linalg.norm(query, axis=1, keepdims=True) - mean
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(few_shot.cl2n(query, mean), expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(few_shot.cl2n(query, mean), axis=1), 1.0, rtol=1e-6)


def test_nearest_centroid_known_answer():
    # Two classes along +x / +y; a shared offset that CL2N removes. Query near each axis.
    offset = np.array([0.0, 0.0, 5.0])
    support = np.array([[1, 0.1, 0], [1, -0.1, 0], [0.1, 1, 0], [-0.1, 1, 0]]) + offset
    labels = np.array([3, 3, 7, 7])
    query = np.array([[0.9, 0.0, 0.0], [0.0, 0.8, 0.0], [1.0, 0.2, 0.0]]) + offset
    np.testing.assert_array_equal(few_shot.nearest_centroid_predict(support, labels, query), [3, 7, 3])


def test_nearest_centroid_equals_bruteforce_euclidean():
    features, labels = _clusters(num_classes=5, per_class=6, noise=0.8, seed=3)
    split = few_shot.sample_split(labels, 2, seed=0)
    predicted = few_shot.nearest_centroid_predict(features[split.support], split.support_labels, features[split.query])
    mean = few_shot.l2n(features[split.support]).mean(0)
    s, q = few_shot.cl2n(features[split.support], mean), few_shot.cl2n(features[split.query], mean)
    centroids = np.stack([s[split.support_labels == c].mean(0) for c in range(5)])
    expected = np.argmin(np.linalg.norm(q[:, None] - centroids[None], axis=-1), axis=1)
    np.testing.assert_array_equal(predicted, expected)


def test_sample_split_is_seeded_disjoint_and_skips_small_classes(capsys):
    labels = np.array([0] * 6 + [1] * 6 + [2] * 2)
    a, b, c = (few_shot.sample_split(labels, 3, seed) for seed in (0, 0, 1))
    np.testing.assert_array_equal(a.support, b.support)
    assert not np.array_equal(a.support, c.support)
    assert set(a.classes) == {0, 1}  # class 2 has only 2 images
    assert not set(a.support) & set(a.query)
    assert sorted(np.concatenate([a.support, a.query])) == list(range(12))
    np.testing.assert_array_equal(np.bincount(a.support_labels), [3, 3])
    trials = few_shot.few_shot_trials(np.eye(14), labels, 3, trials=2)
    assert "fewer than 3 images" in capsys.readouterr().err
    assert [t.seed for t in trials] == [0, 1]


def test_few_shot_trials_separable_and_hard():
    features, labels = _clusters(per_class=8, noise=0.05)
    for k in (1, 5):
        trials = few_shot.few_shot_trials(features, labels, k, trials=5)
        assert len(trials) == 5 and all(t.accuracy == 1.0 for t in trials)
    noise, labels = np.random.default_rng(0).normal(size=(40, 16)), np.repeat(np.arange(4), 10)
    accuracy = np.mean([t.accuracy for t in few_shot.few_shot_trials(noise, labels, 1, trials=5)])
    assert accuracy < 0.6  # random features: near chance (0.25), far from perfect
    with pytest.raises(ValueError, match="no query"):
        few_shot.few_shot_trials(features[:4], np.arange(4), 1, trials=1)


def test_linear_probe_separable():
    features, labels = _clusters(num_classes=3, per_class=10, noise=0.1, seed=5)
    trials = few_shot.few_shot_trials(features, labels, 5, trials=2, classifier="linear")
    assert all(t.accuracy == 1.0 for t in trials)


# ---- zero-shot -----------------------------------------------------------------------------------


def test_zero_shot_top_k_known_answer():
    classes = np.eye(4, dtype=np.float32)  # class c = axis c
    images = np.array([[0.9, 0.3, 0, 0], [0, 0.2, 0.1, 1.0], [0.5, 0.6, 0.0, 0.1]], np.float32)
    top = zero_shot.top_k_classes(images, classes, k=2)
    np.testing.assert_array_equal(top, [[0, 1], [3, 1], [1, 0]])
    acc = zero_shot.top_k_accuracy(top, np.array([0, 1, 0]), ks=(1, 2))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(1.0)}


def test_zero_shot_top_k_chunks_and_small_class_count():
    rng = np.random.default_rng(2)
    images, classes = rng.normal(size=(37, 8)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    top = zero_shot.top_k_classes(images, classes, k=5, chunk=8)  # k capped at 3 classes
    assert top.shape == (37, 3)
    np.testing.assert_array_equal(top, np.argsort(-(images @ classes.T), axis=1))


def test_class_texts_use_taxonomy_or_directory_name():
    from bioclip_jax.data.eval_sources import EvalClass

    raven = Taxon.from_ranks(kingdom="Animalia", genus="Corvus", species="corax", common="common raven")
    classes = [EvalClass("Corvus_corax", raven), EvalClass("house_sparrow")]
    assert zero_shot.class_texts(classes, "com") == ["common raven", "house sparrow"]
    assert zero_shot.class_texts(classes, "sci")[0] == "Corvus corax"
    assert zero_shot.class_texts(classes, "taxon_com")[0] == "Animalia Corvus corax with common name common raven"
    with pytest.raises(ValueError, match="unknown text type"):
        zero_shot.class_texts(classes, "latin")


def test_templates_are_the_80_openai_prompts():
    assert len(templates.OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(templates.OPENAI_IMAGENET_TEMPLATES))
    filled = templates.fill_templates("Corvus {x}")
    assert filled[0] == "a bad photo of a Corvus {x}." and filled[35] == "a Corvus {x} in a video game."
    with pytest.raises(ValueError, match="template set"):
        templates.get_templates("imagenet21k")


# ---- per rank ------------------------------------------------------------------------------------


def _tree():
    def taxon(k, f, g, s):
        return Taxon.from_ranks(kingdom=k, phylum="P", **{"class": "C"}, order="O", family=f, genus=g, species=s)

    return [taxon("Animalia", "Fa", "Ga", "one"),   # 0
            taxon("Animalia", "Fa", "Ga", "two"),   # 1 same genus as 0
            taxon("Animalia", "Fa", "Gb", "three"),  # 2 same family as 0
            taxon("Plantae", "Fa", "Ga", "one")]     # 3 other kingdom (same names below!)


def test_per_rank_accuracy_and_mistake_distance():
    codes = per_rank.lineage_codes(_tree())
    true = np.array([0, 0, 0, 0, 1])
    predicted = np.array([0, 1, 2, 3, 1])
    accuracy = per_rank.per_rank_accuracy(codes, predicted, true)
    assert accuracy["species"] == pytest.approx(2 / 5)
    assert accuracy["genus"] == pytest.approx(3 / 5)
    assert accuracy["family"] == accuracy["order"] == accuracy["kingdom"] == pytest.approx(4 / 5)
    # mistakes: same genus (1), same family (2), other kingdom (7)
    assert per_rank.mistake_distance(codes, predicted, true) == pytest.approx((1 + 2 + 7) / 3)
    assert per_rank.mistake_distance(codes, true, true) == 0.0


# ---- results and plots ---------------------------------------------------------------------------


def test_results_records_json_and_markdown(tmp_path):
    records = [results.summarise("rare_species", "zero_shot_top1", [0.5]),
               results.summarise("rare_species", "5_shot_top1", [0.6, 0.8]),
               results.summarise("rare_species", "5_shot_top1_genus", [0.7, 0.9]),
               results.summarise("rare_species", "5_shot_mistake_distance", [2.0, 3.0], scale=1.0)]
    assert records[1].mean == pytest.approx(70.0) and records[1].std == pytest.approx(10.0)
    path = str(tmp_path / "r" / "results.json")
    results.write_json(records, path)
    rows = json.load(open(path))["records"]
    assert set(rows[0]) == {"dataset", "metric", "mean", "std", "trials"} and rows[1]["trials"] == 2
    assert results.read_json(path) == [dataclass_round(r) for r in records]
    table = results.markdown_table(records)
    assert "| rare_species | 50.00 | 70.00 ± 10.00 |" in table
    assert "| rare_species | 5_shot_top1 | 70.00 ± 10.00 | 80.00 ± 10.00 |" in table
    assert "2.50 ± 0.50 |" in table
    assert results.split_metric("zero_shot_top1_kingdom") == ("zero_shot_top1", "kingdom")
    (tmp_path / "bad.json").write_text('[{"dataset": "x"}]')
    with pytest.raises(ValueError, match="not a results file"):
        results.read_json(str(tmp_path / "bad.json"))


def dataclass_round(record):
    return results.Record(record.dataset, record.metric, round(record.mean, 4), round(record.std, 4), record.trials)


def test_published_keys_and_plots(tmp_path):
    assert plots.published_key("Rare Species") == "rare_species"
    assert plots.published_key("plant_village:train") == "plantvillage"
    assert plots.published_key("my_birds") is None
    records = [results.summarise("rare_species", "zero_shot_top1", [0.4]),
               results.summarise("mine", "zero_shot_top1", [0.2])]
    assert plots.comparison_chart(records, str(tmp_path / "bars.png"))
    assert (tmp_path / "bars.png").stat().st_size > 1000
    assert not plots.comparison_chart(records, str(tmp_path / "none.png"), metrics=("5_shot_top1",))
    assert not (tmp_path / "none.png").exists()
    features, labels = _clusters(num_classes=3, per_class=5)
    plots.embedding_plot(features, [f"family{label}" for label in labels], str(tmp_path / "pca.png"), "test")
    assert (tmp_path / "pca.png").stat().st_size > 1000
    points = plots.pca_2d(features.astype(np.float64))
    assert points.shape == (15, 2) and points[:, 0].var() >= points[:, 1].var()
