"""The pybioclip-shaped Python API on a tiny random model: images in every form, pybioclip's records out."""

import enum
import logging

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.taxa_embeddings import write_taxa_embeddings
from bioclip_jax.taxonomy import Taxon

BIRDS = dict(kingdom="Animalia", phylum="Chordata", **{"class": "Aves"}, order="Passeriformes")
TAXA = [
    Taxon.from_ranks(**BIRDS, family="Corvidae", genus="Corvus", species="corax", common="common raven"),
    Taxon.from_ranks(**BIRDS, family="Corvidae", genus="Corvus", species="frugilegus", common="rook"),
    Taxon.from_ranks(**BIRDS, family="Passeridae", genus="Passer", species="domesticus", common="house sparrow"),
    Taxon.from_ranks(kingdom="Plantae", phylum="Tracheophyta", **{"class": "Magnoliopsida"}, order="Rosales",
                     family="Rosaceae", genus="Rosa", species="canina", common="dog rose"),
]
SPECIES_COLUMNS = ["file_name", "kingdom", "phylum", "class", "order", "family", "genus", "species_epithet",
                   "species", "common_name", "score"]


@pytest.fixture(scope="module")
def model():
    return bioclip_jax.create_model("ViT-Tiny-8", seed=3)


@pytest.fixture(scope="module")
def taxa_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tol")
    write_taxa_embeddings(model, TAXA, str(folder), progress=False)
    return str(folder)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Two image files and the same pixels as a PIL image and an array."""
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    arrays = [(rng.random((48 + 8 * i, 64, 3)) * 255).astype(np.uint8) for i in range(2)]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(array).save(paths[-1])
    return {"paths": paths, "arrays": arrays, "root": root}


@pytest.fixture(scope="module")
def tree_of_life(model, taxa_folder):
    return bioclip_jax.TreeOfLifeClassifier(model, taxa_embeddings=taxa_folder, batch_size=2, progress=False,
                                            decoders="threads")


def test_tree_of_life_records_for_paths_pil_images_and_arrays(tree_of_life, pictures):
    paths, arrays = pictures["paths"], pictures["arrays"]
    by_path = tree_of_life.predict(paths, rank="species", k=3)
    assert [list(r) for r in by_path] == [SPECIES_COLUMNS] * 6
    assert [r["file_name"] for r in by_path] == [paths[0]] * 3 + [paths[1]] * 3
    assert by_path[0]["species"] == f"{by_path[0]['genus']} {by_path[0]['species_epithet']}"
    scores = [r["score"] for r in by_path[:3]]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] and scores[0] < 1
    pil = Image.fromarray(arrays[1])
    mixed = tree_of_life.predict([arrays[0], pil, paths[1]], rank="species", k=3)
    assert [r["file_name"] for r in mixed[::3]] == ["0", "1", paths[1]]  # pybioclip's keys: index, or the path
    for ours, same_pixels in zip(mixed, by_path + by_path[3:]):
        assert ours["species"] == same_pixels["species"]
        assert ours["score"] == pytest.approx(same_pixels["score"], abs=1e-6)
    assert pil.mode == "RGB" and pil.size == (64, 56)  # the caller's image is still open and usable
    one = tree_of_life.predict(paths[0], rank="species", k=3)  # a single image, not in a list
    assert one == by_path[:3]


def test_tree_of_life_ranks_and_the_open_set_answer(tree_of_life, pictures):
    rank = enum.Enum("Rank", "KINGDOM PHYLUM CLASS ORDER FAMILY GENUS SPECIES")  # as pybioclip's Rank
    path = pictures["paths"][0]
    family = tree_of_life.predict(path, rank.FAMILY, k=5)
    assert list(family[0]) == ["file_name", "kingdom", "phylum", "class", "order", "family", "score"]
    assert sorted(r["family"] for r in family) == ["Corvidae", "Passeridae", "Rosaceae"]  # k capped at 3 families
    assert sum(r["score"] for r in family) == pytest.approx(1.0, abs=1e-5)
    (sure,) = tree_of_life.predict(path, rank="auto", confidence=0.01)
    assert list(sure) == SPECIES_COLUMNS + ["rank"] and sure["rank"] == "species"
    best_kingdom = tree_of_life.predict(path, rank="kingdom", k=1)[0]
    (unsure,) = tree_of_life.predict(path, rank="auto", confidence=1.0)  # both kingdoms hold some probability
    assert unsure["rank"] == unsure["kingdom"] == unsure["species"] == ""
    assert unsure["score"] == pytest.approx(best_kingdom["score"], abs=1e-6)
    (answer,) = tree_of_life.predict(path, rank="AUTO", confidence=best_kingdom["score"] - 1e-4)
    assert answer["kingdom"] == best_kingdom["kingdom"] and answer["rank"] != ""
    assert answer["score"] >= best_kingdom["score"] - 1e-4


def test_species_are_grouped_by_rank_once(model, taxa_folder, pictures, monkeypatch):
    """Grouping a large tree's species by rank takes seconds: a classifier does it once, not per predict."""
    from bioclip_jax.classify import labels, open_set

    calls, grouped = [], labels.rank_groups

    def counted(taxa, rank):
        calls.append(rank)
        return grouped(taxa, rank)

    tree = open_set.taxon_tree
    monkeypatch.setattr(labels, "rank_groups", counted)
    monkeypatch.setattr(open_set, "taxon_tree", lambda taxa: calls.append("tree") or tree(taxa))
    classifier = bioclip_jax.TreeOfLifeClassifier(model, taxa_embeddings=taxa_folder, batch_size=2, progress=False,
                                                  decoders="threads")
    path = pictures["paths"][0]
    genus = [classifier.predict(path, rank="genus", k=1) for _ in range(2)]
    assert genus[0] == genus[1] and calls == ["genus"]
    answers = [classifier.predict(path, rank="auto", confidence=p)[0]["rank"] for p in (0.01, 1.0)]
    assert answers == ["species", ""] and calls == ["genus", "tree"]


def test_custom_labels_and_bins(model, pictures):
    labels = ["crow", "raven", "rose"]
    custom = bioclip_jax.CustomLabelsClassifier(labels, model, progress=False, decoders="threads")
    records = custom.predict(pictures["paths"])
    assert [list(r) for r in records] == [["file_name", "classification", "score"]] * 6  # k: every label
    assert {r["classification"] for r in records} == set(labels)
    assert sum(r["score"] for r in records[:3]) == pytest.approx(1.0, abs=1e-5)
    progress = []
    assert len(custom.predict(pictures["arrays"], 1, 1, lambda done, total: progress.append((done, total)))) == 2
    assert progress == [(1, 2), (2, 2)]  # pybioclip's callback(processed, total), after each batch of 1
    binning = bioclip_jax.CustomLabelsBinningClassifier({"crow": "bird", "raven": "bird", "rose": "plant"}, model,
                                                        progress=False, decoders="threads")
    bins = binning.predict(pictures["paths"][0])
    assert [r["classification"] for r in bins] in (["bird", "plant"], ["plant", "bird"])
    by_label = {r["classification"]: r["score"] for r in records[:3]}
    assert {r["classification"]: r["score"] for r in bins} == pytest.approx(
        {"bird": by_label["crow"] + by_label["raven"], "plant": by_label["rose"]}, abs=1e-5)


def test_unreadable_images_are_skipped_and_named(tree_of_life, pictures, caplog):
    broken = pictures["root"] / "broken.jpg"
    broken.write_bytes(b"not an image")
    missing = str(pictures["root"] / "missing.jpg")
    with caplog.at_level(logging.WARNING, logger="bioclip_jax"):
        records = tree_of_life.predict([str(broken), pictures["paths"][0], missing], rank="genus", k=1)
    assert [r["file_name"] for r in records] == [pictures["paths"][0]]
    assert [s.key for s in tree_of_life.skipped] == [str(broken), missing]
    assert "skipped 2 unreadable images" in caplog.text and "missing.jpg" in caplog.text
    progress = []
    assert tree_of_life.predict(missing, callback=lambda done, total: progress.append((done, total))) == []
    assert progress == [(1, 1)]  # no batch was embedded, yet the caller hears that the one image is done


def test_wrong_arguments_are_one_sentence(model, tree_of_life, pictures, tmp_path):
    for bad, words in [(3, "images is a int"), ([3], r"images\[0\] is a int"),
                       ([np.zeros((4, 4, 3), np.float32)], "float32 array")]:
        with pytest.raises(ValueError, match=words):
            tree_of_life.predict(bad)
    with pytest.raises(ValueError, match="rank must be one of kingdom, .*, auto, got 'tribe'"):
        tree_of_life.predict(pictures["paths"], rank="tribe")
    with pytest.raises(ValueError, match="k must be >= 1"):
        tree_of_life.predict(pictures["paths"], k=0)
    with pytest.raises(ValueError, match="model_str 'ViT-Tiny-8' names no weights"):
        bioclip_jax.CustomLabelsClassifier(["a"], "ViT-Tiny-8")
    with pytest.raises(ValueError, match="cls_ary holds no labels"):
        bioclip_jax.CustomLabelsClassifier([" "], model)
    with pytest.raises(ValueError, match="no bin for 'raven'"):
        bioclip_jax.CustomLabelsBinningClassifier({"crow": "bird", "raven": ""}, model)
    with pytest.raises(FileNotFoundError, match=f"no taxa embeddings in {tmp_path / 'none'}"):
        bioclip_jax.TreeOfLifeClassifier(model, taxa_embeddings=str(tmp_path / "none"))
