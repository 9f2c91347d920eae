"""`bioclip-jax make-shards`: a user's folders or table -> TreeOfLife-layout shards, held-out set, report."""

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from bioclip_jax.cli import main as cli
from bioclip_jax.data.eval_sources import open_eval_data
from bioclip_jax.data.shard_index import INDEX_SUFFIX
from bioclip_jax.data.tar_source import TarShardSource
from bioclip_jax.ingest import collection as collection_lib
from bioclip_jax.taxonomy import CAPTION_FILES, NAME_FILES, Taxon, sample_captions
from collection_helpers import TAXA_HEADER, png_bytes, write_collection, write_taxa

SPECIES, IMAGES = 4, 5


def _train_samples(out) -> list[dict]:
    source = TarShardSource(os.path.join(out, "train"))
    return [source[i] for i in range(len(source))]


def _skipped(out) -> list[dict]:
    with open(os.path.join(out, "skipped.csv"), encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_folders_become_captioned_shards_and_a_held_out_set(tmp_path, capsys):
    photos = tmp_path / "photos"
    tree = write_collection(photos, species=SPECIES, images=IMAGES, png_every=2)
    first = photos / tree[0].taxon.scientific_name
    (first / "broken.jpg").write_bytes((first / "000.jpg").read_bytes()[:200])  # truncated JPEG
    (first / "notes.jpg").write_bytes(b"not an image at all")
    os.makedirs(photos / "Unknown beetle")
    shutil.copy(first / "000.jpg", photos / "Unknown beetle" / "x.jpg")
    out = tmp_path / "out"

    assert cli.main(["make-shards", "--folder", str(photos), "--output", str(out), "--held-out-images", "0.2",
                     "--samples-per-shard", "4", "--no-progress", "--threads", "2"]) == 0
    printed = capsys.readouterr().out

    samples = _train_samples(out)
    held_out = open_eval_data(f"folder:{out}/held_out/images")  # finds held_out/taxa.csv beside the folder
    assert len(samples) == SPECIES * (IMAGES - 1) and len(held_out) == SPECIES  # 0.2 of 5 = 1 per class
    by_name = {s.taxon.scientific_name: s.taxon for s in tree}
    for sample in samples:  # every member of the TreeOfLife-10M layout, made from the class's taxonomy
        taxon = Taxon.from_ranks(**dict(zip(("kingdom", "phylum", "class", "order", "family", "genus", "species"),
                                            sample["taxonomic_name.txt"].decode().split())))
        name = f"{taxon.genus} {taxon.species}"
        want = {ext: text.encode() for ext, text in sample_captions(by_name[name]).items()}
        assert {ext: sample[ext] for ext in [*CAPTION_FILES, *NAME_FILES]} == want
        assert sample["jpg"][:3] == collection_lib.JPEG_MAGIC  # PNGs were re-encoded
    assert held_out.has_taxonomy and sorted(held_out.class_names) == sorted(by_name)
    assert all(os.path.exists(p + INDEX_SUFFIX) for p in TarShardSource(f"{out}/train").shard_paths)

    reasons = sorted(row["reason"] for row in _skipped(out))
    assert reasons == ["class not in taxa.csv", "unreadable image", "unreadable image"]
    assert "unreadable image: 2" in printed and "Unknown beetle" in printed
    assert "usable:  16 (100.00%)" in printed  # check-data ran on the shards
    assert f"--config.data.train_shards={out}/train" in printed
    info = json.loads((out / "info.json").read_text())
    assert info["counts"]["train_images"] == 16 and info["counts"]["skipped"] == 3


def test_a_table_of_paths_and_taxonomy(tmp_path, capsys):
    photos = tmp_path / "photos"
    tree = write_collection(photos, species=3, images=3)
    rows = [["filepath", "kingdom", "phylum", "class", "order", "family", "genus", "species", "common"]]
    for s in tree:
        for n in range(3):
            rows.append([f"photos/{s.taxon.scientific_name}/{n:03d}.jpg", *s.taxon.ranks_tuple(), s.taxon.common])
    rows.append(["photos/elsewhere.jpg", "", "", "", "", "", "", "", "mystery"])  # no taxonomy
    rows.append(["photos/missing.jpg", *tree[0].taxon.ranks_tuple(), ""])            # no such file
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(rows)

    assert cli.main(["make-shards", "--csv", str(tmp_path / "labels.csv"), "--output", str(tmp_path / "out"),
                     "--held-out-images", "0", "--no-progress"]) == 0
    assert len(_train_samples(tmp_path / "out")) == 9
    assert sorted(row["reason"] for row in _skipped(tmp_path / "out")) == ["missing file", "no taxonomy"]
    assert "no held-out images" in capsys.readouterr().out


def test_held_out_classes_are_left_out_of_training(tmp_path):
    photos = tmp_path / "photos"
    write_collection(photos, species=5, images=3)
    out = tmp_path / "out"
    assert cli.main(["make-shards", "--folder", str(photos), "--output", str(out), "--held-out-classes", "2",
                     "--held-out-images", "0", "--no-progress"]) == 0
    trained = {s["scientific_name.txt"].decode() for s in _train_samples(out)}
    held = set(open_eval_data(f"folder:{out}/held_out/images").class_names)
    assert len(trained) == 3 and len(held) == 2 and not trained & held


def test_split_is_seeded_and_keeps_a_training_image_per_class():
    found = collection_lib.Collection(
        classes=[collection_lib.CollectionClass(f"c{i}", Taxon(genus="Corvus", species=f"s{i}")) for i in range(4)],
        images=[collection_lib.LabelledImage(f"{i}-{n}.jpg", i) for i in range(4) for n in range(1 + i)],
        skipped=[])
    train, held = collection_lib.held_out_split(found, images=0.9, seed=3)
    assert (train, held) == collection_lib.held_out_split(found, images=0.9, seed=3)
    assert {image.class_index for image in train} == {0, 1, 2, 3}  # class 0's only image stays
    assert len(held) == 0 + 1 + 2 + 3
    assert collection_lib.held_out_split(found, images=0.9, seed=4) != (train, held)
    with pytest.raises(ValueError, match="leaves none to train on"):
        collection_lib.held_out_split(found, classes=4)


def test_exif_rotation_is_applied_and_plain_jpegs_are_copied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = 255
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(rotated, format="JPEG", exif=exif)
    (tmp_path / "rotated.jpg").write_bytes(rotated.getvalue())
    upright = io.BytesIO()
    Image.fromarray(pixels).save(upright, format="JPEG")
    (tmp_path / "upright.jpg").write_bytes(upright.getvalue())
    (tmp_path / "large.png").write_bytes(png_bytes(np.zeros((300, 200, 3), np.uint8)))

    assert Image.open(io.BytesIO(collection_lib.training_jpeg(str(tmp_path / "rotated.jpg")))).size == (20, 40)
    assert collection_lib.training_jpeg(str(tmp_path / "upright.jpg")) == upright.getvalue()
    assert Image.open(io.BytesIO(collection_lib.training_jpeg(str(tmp_path / "large.png"), resize=100))).size \
        == (100, 150)


def test_clear_errors(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_collection(photos, species=2, images=2)
    os.remove(photos / "taxa.csv")
    assert cli.main(["make-shards", "--folder", str(photos), "--output", str(tmp_path / "a"), "--no-progress"]) == 2
    assert "no taxa.csv in or next to" in capsys.readouterr().err

    write_taxa(photos / "taxa.csv", [])
    (tmp_path / "table.csv").write_text("picture,genus,species\nx.jpg,Corvus,corax\n")
    assert cli.main(["make-shards", "--csv", str(tmp_path / "table.csv"), "--output", str(tmp_path / "b"),
                     "--no-progress"]) == 1
    assert "has no image path column: name one of filepath" in capsys.readouterr().err

    (tmp_path / "c" / "train").mkdir(parents=True)
    (tmp_path / "ok.csv").write_text("path,genus,species\nphotos/x.jpg,Corvus,corax\n")
    assert cli.main(["make-shards", "--csv", str(tmp_path / "ok.csv"), "--output", str(tmp_path / "c"),
                     "--no-progress"]) == 2
    assert "already holds shards (train); pass --overwrite" in capsys.readouterr().err


def _make_shards(*args) -> int:
    return cli.main(["make-shards", *map(str, args), "--no-progress", "--threads", "2"])


def test_an_out_that_holds_or_sits_in_an_input_is_refused(tmp_path, capsys):
    photos = tmp_path / "photos"
    write_collection(photos, species=2, images=2)
    taxa = (photos / "taxa.csv").read_bytes()
    assert _make_shards("--folder", photos, "--output", photos, "--overwrite") == 1
    assert f"--output {photos} contains the input {photos}" in capsys.readouterr().err
    assert _make_shards("--folder", photos, "--output", photos / "shards") == 1
    assert f"--output {photos / 'shards'} is inside the input folder {photos}" in capsys.readouterr().err
    os.makedirs(tmp_path / "meta")
    os.rename(photos / "taxa.csv", tmp_path / "meta" / "taxa.csv")
    assert _make_shards("--folder", photos, "--taxa", tmp_path / "meta" / "taxa.csv", "--output", tmp_path / "meta",
                        "--overwrite") == 1
    assert f"contains the input {tmp_path / 'meta' / 'taxa.csv'}" in capsys.readouterr().err
    assert os.listdir(tmp_path / "meta") == ["taxa.csv"] and (tmp_path / "meta" / "taxa.csv").read_bytes() == taxa
    assert not (photos / "train").exists() and not (photos / "shards").exists()


def test_copies_of_an_image_are_dropped_before_the_split(tmp_path, capsys):
    photos = tmp_path / "photos"
    tree = write_collection(photos, species=3, images=4)
    first, second = sorted(photos / s.taxon.scientific_name for s in tree)[:2]  # the first copy in order is kept
    shutil.copy(first / "000.jpg", first / "copy.jpg")      # the same photo twice in its class
    shutil.copy(first / "001.jpg", second / "stray.jpg")    # and once filed under another class
    out = tmp_path / "out"
    assert _make_shards("--folder", photos, "--output", out, "--held-out-images", "0.5") == 0

    written = [s["jpg"] for s in _train_samples(out)]
    written += [p.read_bytes() for p in sorted((out / "held_out" / "images").rglob("*.jpg"))]
    assert len(written) == 3 * 4 and len(set(written)) == len(written)  # no image on both sides of the split
    dropped = {row["where"]: row for row in _skipped(out) if row["reason"] == "duplicate image"}
    assert sorted(dropped) == sorted([str(first / "copy.jpg"), str(second / "stray.jpg")])
    assert str(first / "000.jpg") in dropped[str(first / "copy.jpg")]["detail"]
    assert "duplicate image: 2" in capsys.readouterr().out


@pytest.mark.parametrize("row, fields", [(["Corvus corax", "Animalia", "Chordata", "Aves"], 4),
                                         (["Corvus corax", "Animalia", "Chordata", "Aves", "Passeriformes",
                                           "Corvidae", "Corvus", "corax", "raven", " common"], 10)])
def test_a_taxa_row_with_too_few_or_too_many_fields_is_refused_by_line(tmp_path, capsys, row, fields):
    photos = tmp_path / "photos"
    tree = write_collection(photos, species=2, images=2)
    with open(photos / "taxa.csv", "a", encoding="utf-8") as handle:
        handle.write(",".join(row) + "\n")  # line 4: after the header and two good rows
    assert _make_shards("--folder", photos, "--output", tmp_path / "out") == 1
    assert f"{photos / 'taxa.csv'}:4: {fields} fields where the header has 9" in capsys.readouterr().err

    table = tmp_path / "labels.csv"
    image = photos / tree[0].taxon.scientific_name / "000.jpg"
    table.write_text(f"path,{','.join(TAXA_HEADER[1:])}\n{image},{','.join(row[1:])}\n")
    assert _make_shards("--csv", table, "--output", tmp_path / "out") == 1
    assert f"{table}:2: {fields} fields where the header has 9" in capsys.readouterr().err


def test_images_in_sub_folders_belong_to_their_class_folder(tmp_path):
    photos = tmp_path / "photos"
    tree = write_collection(photos, species=2, images=2)
    nested = photos / tree[0].taxon.scientific_name / "site a" / "2024"
    write_collection(tmp_path / "more", species=1, images=2, seed=5)
    os.makedirs(nested)
    for n, path in enumerate(sorted((tmp_path / "more").rglob("*.jpg"))):
        shutil.copy(path, nested / f"{n}.jpg")
    out = tmp_path / "out"
    assert _make_shards("--folder", photos, "--output", out, "--held-out-images", "0") == 0
    names = [s["scientific_name.txt"].decode() for s in _train_samples(out)]
    assert names.count(tree[0].taxon.scientific_name) == 4 and len(names) == 6


def test_when_no_training_image_can_be_read_nothing_is_left_behind(tmp_path, capsys):
    photos = tmp_path / "photos"
    tree = write_collection(photos, species=2, images=2)
    table = tmp_path / "labels.csv"
    rows = [f"photos/{s.taxon.scientific_name}/{n:03d}.jpg,{','.join(s.taxon.ranks_tuple())}"
            for s in tree for n in range(2)]
    table.write_text(f"path,{','.join(TAXA_HEADER[1:-1])}\n" + "\n".join(rows) + "\n")
    moved = tmp_path / "moved"
    os.rename(photos, moved)  # every path in the table is now missing
    out = tmp_path / "out"
    assert _make_shards("--csv", table, "--output", out, "--held-out-images", "0") == 1
    err = capsys.readouterr().err
    assert "none of the 4 training images could be read (missing file: 4, e.g. " in err
    assert "skipped.csv" not in err and not (out / "train").exists()
    os.rename(moved, photos)
    assert _make_shards("--csv", table, "--output", out, "--held-out-images", "0") == 0  # no --overwrite needed
