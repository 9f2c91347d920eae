"""The synthetic tree of life: TreeOfLife-10M layout, held-out split, determinism, traits that follow the tree."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
import tarfile
import uuid
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from bioclip_jax.cli import make_synthetic as cli
from bioclip_jax.synthetic.dataset import CATALOG_COLUMNS, TAXA_COLUMNS, make_synthetic
from bioclip_jax.synthetic.images import render
from bioclip_jax.synthetic.names import EPITHETS
from bioclip_jax.synthetic.tree import build_species
from bioclip_jax.taxonomy import Taxon, sample_captions

MEMBERS = {
    "jpg", "scientific_name.txt", "taxonomic_name.txt", "common_name.txt", "sci.txt", "com.txt",
    "taxon.txt", "taxonTag.txt", "sci_com.txt", "taxon_com.txt", "taxonTag_com.txt",
}
SPECIES, PER_SPECIES, SIZE = 40, 6, 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synthetic"))
    summary = make_synthetic(out, species=SPECIES, images_per_species=PER_SPECIES, held_out_species=0.15,
                             seed=3, image_size=SIZE, val_fraction=0.34, samples_per_shard=50)
    return out, summary


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def _samples(split_dir):
    """{key: {ext: bytes}} for every sample in a split's shards, checking members stay together."""
    samples, last_key = {}, None
    for name in sorted(os.listdir(split_dir)):
        with tarfile.open(os.path.join(split_dir, name)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                if key != last_key:
                    assert key not in samples, f"members of sample {key} are not contiguous"
                    samples[key], last_key = {}, key
                samples[key][ext] = tar.extractfile(member).read()
    return samples


def _decode(payload):
    return np.asarray(Image.open(io.BytesIO(payload)).convert("RGB"), np.float32)


def _tree_files(root):
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, root)] = handle.read()
    return files


def test_shards_have_the_treeoflife_layout(dataset):
    out, summary = dataset
    for split in ("train", "val"):
        names = sorted(os.listdir(os.path.join(out, split)))
        assert names == [f"shard-{i:06d}.tar" for i in range(len(names))] and names
        for key, members in _samples(os.path.join(out, split)).items():
            assert set(members) == MEMBERS
            assert str(uuid.UUID(key)) == key and "." not in key
            image = Image.open(io.BytesIO(members["jpg"]))
            assert image.format == "JPEG" and image.size == (SIZE, SIZE)
            name = members["scientific_name.txt"].decode()
            assert members["sci.txt"].decode() == f"a photo of {name}."
    assert summary.counts["train_shards"] == len(os.listdir(os.path.join(out, "train"))) > 1


def test_captions_come_from_the_taxonomy_of_the_catalog_row(dataset):
    out, _ = dataset
    _, rows = _read_csv(os.path.join(out, "catalog.csv"))
    by_id = {row["treeoflife_id"]: row for row in rows}
    for key, members in _samples(os.path.join(out, "train")).items():
        expected = sample_captions(Taxon.from_mapping(by_id[key]))
        assert {ext: members[ext].decode() for ext in expected} == expected
        assert by_id[key]["split"] == "train"


def test_catalog_has_the_treeoflife_columns_and_one_row_per_image(dataset):
    out, summary = dataset
    columns, rows = _read_csv(os.path.join(out, "catalog.csv"))
    assert tuple(columns) == CATALOG_COLUMNS
    assert len(rows) == SPECIES * PER_SPECIES
    assert len({row["treeoflife_id"] for row in rows}) == len(rows)
    splits = defaultdict(set)
    for row in rows:
        splits[row["split"]].add(row["treeoflife_id"])
        assert all(row[c] == "" for c in CATALOG_COLUMNS[2:9])  # source columns are irrelevant here
        assert all(row[c] for c in TAXA_COLUMNS)
    assert set(splits) == {"train", "val", "held_out"}
    for split in ("train", "val"):
        assert splits[split] == set(_samples(os.path.join(out, split)))
        assert len(splits[split]) == summary.counts[f"{split}_images"]
    with open(os.path.join(out, "info.json"), encoding="utf-8") as handle:
        info = json.load(handle)
    assert info["parameters"]["seed"] == 3 and info["parameters"]["images_per_species"] == PER_SPECIES
    assert info["counts"]["species"] == SPECIES and info["counts"]["held_out_images"] == len(splits["held_out"])
    assert os.path.exists(os.path.join(out, "README.md"))


def test_held_out_species_are_absent_from_training_but_reachable_through_the_tree(dataset):
    out, summary = dataset
    _, held = _read_csv(os.path.join(out, "held_out", "taxa.csv"))
    held_names = {f"{row['genus']} {row['species']}" for row in held}
    assert len(held_names) == summary.counts["held_out_species"] == round(0.15 * SPECIES)
    seen = set()
    for split in ("train", "val"):
        seen |= {m["scientific_name.txt"].decode() for m in _samples(os.path.join(out, split)).values()}
    assert not held_names & seen
    _, rows = _read_csv(os.path.join(out, "catalog.csv"))
    train_rows = [row for row in rows if row["split"] != "held_out"]
    for row in rows:
        assert (f"{row['genus']} {row['species']}" in held_names) == (row["split"] == "held_out")
    folder = os.path.join(out, "held_out", "images")
    assert set(os.listdir(folder)) == held_names
    for name in held_names:
        files = sorted(os.listdir(os.path.join(folder, name)))
        assert len(files) == PER_SPECIES and all(f.endswith(".jpg") for f in files)
    for row in held:  # zero-shot must be possible only through shared names
        assert any(r["genus"] == row["genus"] for r in train_rows)
        assert any(r["species"] == row["species"] and r["genus"] != row["genus"] for r in train_rows)


@pytest.mark.parametrize("seed", range(4))
def test_even_a_large_held_out_share_keeps_genus_and_epithet_in_training(seed):
    tree = build_species(30, 0.3, seed)
    train = [s for s in tree if not s.held_out]
    held = [s for s in tree if s.held_out]
    assert len(held) == 9
    for s in held:
        genus_size = sum(o.taxon.genus == s.taxon.genus for o in tree)
        assert sum(o.taxon.genus == s.taxon.genus for o in train) >= genus_size / 2
        assert any(o.epithet == s.epithet and o.taxon.genus != s.taxon.genus for o in train)


def test_taxa_csv_lists_every_species_once(dataset):
    out, _ = dataset
    columns, taxa = _read_csv(os.path.join(out, "taxa.csv"))
    _, held = _read_csv(os.path.join(out, "held_out", "taxa.csv"))
    assert tuple(columns) == TAXA_COLUMNS
    assert len(taxa) == SPECIES == len({(row["genus"], row["species"]) for row in taxa})
    assert all(row in taxa for row in held)


def test_same_seed_gives_the_same_bytes_with_any_worker_count_and_another_seed_does_not(tmp_path):
    kwargs = dict(species=10, images_per_species=3, held_out_species=2, image_size=24, samples_per_shard=7)
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)):
        make_synthetic(str(tmp_path / name), seed=seed, workers=workers, **kwargs)
    first, second, other = (_tree_files(tmp_path / name) for name in "abc")
    assert first == second
    assert first["train/shard-000000.tar"] != other["train/shard-000000.tar"]
    assert first["taxa.csv"] != other["taxa.csv"]


def test_names_are_unique_per_rank_and_carry_rank_suffixes():
    tree = build_species(300, 0.1, seed=1)
    ranks = ("kingdom", "phylum", "class", "order", "family", "genus")
    parent_of = {}
    for s in tree:
        for depth, rank in enumerate(ranks[1:], start=1):
            name = s.taxon.lineage(rank)[-1]
            assert parent_of.setdefault(name, s.taxon.lineage(ranks[depth - 1])) == s.taxon.lineage(ranks[depth - 1])
        family = s.taxon.family
        assert family.endswith("idae") if s.taxon.kingdom in ("Animalia", "Protozoa") else family.endswith("aceae")
        if s.taxon.kingdom == "Fungi":
            assert s.taxon.phylum.endswith("mycota") and s.taxon.cls.endswith("mycetes")
    assert len({s.taxon.scientific_name for s in tree}) == len(tree)
    assert {s.taxon.kingdom for s in tree} <= {"Animalia", "Plantae", "Fungi", "Chromista", "Protozoa"}
    assert len({s.taxon.kingdom for s in tree}) >= 3


def test_common_names_are_trait_adjective_plus_genus_noun():
    tree = build_species(120, 0.1, seed=2)
    genus_noun, family_noun = {}, defaultdict(set)
    for s in tree:
        adjective = EPITHETS[s.epithet].adjective
        assert s.taxon.common.startswith(adjective + " ")
        noun = s.taxon.common[len(adjective) + 1:]
        assert genus_noun.setdefault(s.taxon.genus, noun) == noun  # one noun per genus
        family_noun[s.taxon.family].add(noun.split()[-1])
    assert len(set(genus_noun.values())) == len(genus_noun)
    assert all(len(nouns) == 1 for nouns in family_noun.values())  # the group noun is the family's
    assert len({s.taxon.common for s in tree}) == len(tree)


def _features(pixels, size=8):
    image = Image.fromarray(pixels.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(image, np.float32).ravel() / 255.0


def _labelled_images(out):
    """(features, kingdom, genus, split) for every image of the dataset, decoded from the files."""
    _, rows = _read_csv(os.path.join(out, "catalog.csv"))
    by_id = {row["treeoflife_id"]: row for row in rows}
    items = []
    for split in ("train", "val"):
        for key, members in _samples(os.path.join(out, split)).items():
            items.append((_features(_decode(members["jpg"])), by_id[key]["kingdom"], by_id[key]["genus"], split))
    _, held = _read_csv(os.path.join(out, "held_out", "taxa.csv"))
    for row in held:
        folder = os.path.join(out, "held_out", "images", f"{row['genus']} {row['species']}")
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as handle:
                items.append((_features(_decode(handle.read())), row["kingdom"], row["genus"], "held_out"))
    return items


def test_kingdoms_separate_by_nearest_centroid_on_raw_pixels(dataset):
    items = _labelled_images(dataset[0])
    kingdoms = sorted({k for _, k, _, _ in items})
    assert len(kingdoms) >= 3
    centroids = np.stack([np.mean([f for f, k, _, s in items if k == kingdom and s == "train"], 0)
                          for kingdom in kingdoms])
    test = [(f, kingdoms.index(k)) for f, k, _, s in items if s != "train"]
    predicted = [int(np.argmin(((centroids - f) ** 2).sum(1))) for f, _ in test]
    accuracy = np.mean([p == label for p, (_, label) in zip(predicted, test)])
    assert accuracy > 0.85, f"kingdom nearest-centroid accuracy {accuracy:.2f} (chance {1 / len(kingdoms):.2f})"


def test_images_of_one_genus_are_closer_than_images_of_different_kingdoms(dataset):
    items = _labelled_images(dataset[0])
    colour = np.stack([f.reshape(-1, 3).mean(0) for f, _, _, _ in items])  # mean colour per image
    kingdom = np.array([k for _, k, _, _ in items])
    genus = np.array([g for _, _, g, _ in items])
    distance = np.linalg.norm(colour[:, None] - colour[None], axis=-1)
    same_genus = (genus[:, None] == genus[None]) & ~np.eye(len(items), dtype=bool)
    other_kingdom = kingdom[:, None] != kingdom[None]
    assert distance[same_genus].mean() < 0.5 * distance[other_kingdom].mean()


def _species_fraction(s, seed, measure, n=12, size=48):
    return np.mean([measure(render(s.looks, np.random.default_rng([seed, i]), size).astype(np.float32))
                    for i in range(n)])


def _red(pixels):
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    return np.mean((r > 150) & (g < 90) & (b < 90))


def _white(pixels):
    return np.mean((pixels.min(-1) > 175) & (np.ptp(pixels, -1) < 35))


def _black(pixels):
    return np.mean(pixels.max(-1) < 50)


@pytest.mark.parametrize("epithet, measure", [("rubra", _red), ("alba", _white), ("nigra", _black)])
def test_epithet_traits_are_visible_against_the_rest_of_the_genus(epithet, measure):
    tree = build_species(120, 0.0, seed=4)
    checked = 0
    for s in tree:
        if s.epithet != epithet:
            continue
        siblings = [o for o in tree if o.taxon.genus == s.taxon.genus and o is not s
                    and o.looks.trait not in ("white", "black", "yellow")]
        if not siblings:
            continue
        own = _species_fraction(s, 0, measure)
        others = [_species_fraction(o, 0, measure) for o in siblings]
        assert own > max(others) and own > 2 * np.mean(others) + 0.01, \
            f"{s.taxon.scientific_name}: {own:.3f} vs siblings {np.round(others, 3)}"
        checked += 1
    assert checked >= 2


def test_size_epithets_change_the_organism_size():
    tree = build_species(60, 0.0, seed=5)
    base = dataclasses.replace(tree[0].looks, pattern="plain", body_rgb=(255.0, 0.0, 255.0))

    def area(trait):
        images = [render(dataclasses.replace(base, trait=trait), np.random.default_rng(i), 48) for i in range(8)]
        return np.mean([np.mean((p[..., 0] > 150) & (p[..., 1] < 110) & (p[..., 2] > 150)) for p in images])

    assert area("tiny") < 0.6 * area("") and area("giant") > 1.5 * area("")


def test_held_out_needs_enough_species_and_fails_before_writing(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(ValueError, match="can hold out only"):
        make_synthetic(str(out), species=10, images_per_species=2, held_out_species=0.9)
    assert not out.exists()
    with pytest.raises(ValueError, match="images_per_species"):
        make_synthetic(str(out), images_per_species=0)
    with pytest.raises(ValueError, match="held_out_species"):
        make_synthetic(str(out), species=10, held_out_species=2.5)
    with pytest.raises(ValueError, match="whole number of species"):
        make_synthetic(str(out), species=0)
    with pytest.raises(ValueError, match="image_size must be a whole number"):
        make_synthetic(str(out), image_size=64.5)
    assert not out.exists()


def test_cli_writes_and_summarises_and_refuses_to_mix_datasets(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["--output", out, "--species", "8", "--images-per-species", "2", "--held-out-species", "1",
            "--image-size", "20", "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "species: 8 (7 train, 1 held out)" in printed
    assert "train/:" in printed and os.path.exists(os.path.join(out, "info.json"))
    assert cli.main(argv) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert cli.main(argv + ["--overwrite", "--seed", "1"]) == 0
    assert cli.main(["--output", out, "--image-size", "4", "--overwrite"]) == 2
    assert "image_size" in capsys.readouterr().err


def test_cli_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "bioclip_jax.cli.make_synthetic", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--images-per-species" in result.stdout
