"""Evaluation data sources: image folders (+ taxa.csv), TFDS through mock_data, webdataset shards."""

import io
import os

import pytest
from PIL import Image

from bioclip_jax.data import eval_sources
from bioclip_jax.data.tar_writer import ShardWriter

TAXA_CSV = """kingdom,phylum,class,order,family,genus,species,common
Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,corax,common raven
Animalia,Chordata,Aves,Passeriformes,Passeridae,Passer,domesticus,house sparrow
"""


def _jpeg(colour, size=(20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def _folder(root, classes):
    for name, count in classes.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            (root / name / f"{i}.jpg").write_bytes(_jpeg((i * 20, 100, 50)))
    return root


def test_folder_classes_labels_and_taxa_next_to_it(tmp_path, capsys):
    root = _folder(tmp_path / "images", {"Passer_domesticus": 2, "Corvus corax": 3, "Unknown thing": 1})
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a class")
    (tmp_path / "taxa.csv").write_text(TAXA_CSV)  # beside the folder, as the synthetic held_out/ has it
    data = eval_sources.open_eval_data(f"folder:{root}")
    assert data.name == "images" and len(data) == 6
    assert data.class_names == ["Corvus corax", "Passer_domesticus", "Unknown thing"]
    assert data.classes[0].taxon.common == "common raven"
    assert data.classes[1].taxon.family == "Passeridae"  # underscores match the scientific name
    assert data.classes[2].taxon is None and not data.has_taxonomy
    err = capsys.readouterr().err
    assert "has no images" in err and "1 of 3 classes not in" in err
    items = list(data.items())
    assert [i.label for i in items] == [0, 0, 0, 1, 1, 2]
    with items[0].open() as image:
        assert image.size == (20, 16)


def test_folder_matches_class_name_column(tmp_path):
    root = _folder(tmp_path / "d", {"raven": 1, "sparrow": 1})
    taxa = tmp_path / "elsewhere.csv"
    taxa.write_text("class_name,genus,species,common,kingdom\nraven,Corvus,corax,common raven,Animalia\n"
                    "sparrow,Passer,domesticus,,Animalia\n")
    data = eval_sources.open_eval_data(str(root), name="birds", taxa=str(taxa))  # bare directory = folder:
    assert data.name == "birds" and data.has_taxonomy
    assert [c.taxon.scientific_name for c in data.classes] == ["Corvus corax", "Passer domesticus"]


def test_bad_specs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        eval_sources.open_eval_data(f"folder:{tmp_path}/missing")
    with pytest.raises(ValueError, match="unknown data source"):
        eval_sources.open_eval_data("s3:bucket")
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="no class directories"):
        eval_sources.open_eval_data(f"folder:{tmp_path / 'x'}")
    with pytest.raises(FileNotFoundError, match="shard"):
        eval_sources.open_eval_data(f"shards:{tmp_path}/shard-{{000..003}}.tar")
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no taxonomy columns"):
        eval_sources.read_taxa_lookup(str(tmp_path / "t.csv"))


def test_tfds_source_through_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):
        data = eval_sources.open_eval_data("tfds:oxford_flowers102:test")
        assert data.name == "oxford_flowers102:test" and len(data) == 5
        assert len(data.classes) == 102 and data.classes[0].name == "pink primrose"
        items = list(data.items())
        assert [i.key for i in items][:2] == ["oxford_flowers102:test[0]", "oxford_flowers102:test[1]"]
        image, label = items[0].open()  # image and label come from one record read
        assert image.mode == "RGB" and 0 <= label < 102
        default_split = eval_sources.open_eval_data("tfds:oxford_flowers102")
        assert default_split.name == "oxford_flowers102:test"


def _write_shards(directory, corrupt_tail=False):
    names = ["Corvus corax", "Passer domesticus", "Corvus corax", "Rosa canina", "Rosa canina"]
    with ShardWriter(str(directory), samples_per_shard=3) as writer:
        for i, name in enumerate(names):
            writer.write(f"s{i:03d}", {"jpg": _jpeg((40 * i, 0, 0)), "scientific_name.txt": name.encode(),
                                       "cls": str(i % 2).encode()})
        writer.write("nolabel", {"jpg": _jpeg((0, 0, 0))})
    paths = sorted(os.listdir(directory))
    if corrupt_tail:
        last = directory / paths[-1]
        last.write_bytes(last.read_bytes()[:700])  # cut inside the second shard
    return paths


def test_shards_range_pattern_labels_and_items(tmp_path):
    paths = _write_shards(tmp_path / "val")
    assert paths == ["shard-000000.tar", "shard-000001.tar"]
    data = eval_sources.open_eval_data(f"shards:{tmp_path}/val/shard-{{000000..000001}}.tar")
    assert data.name == "val" and len(data) == 5  # the sample without a label is not counted
    assert data.class_names == ["Corvus corax", "Passer domesticus", "Rosa canina"]
    items = list(data.items())
    assert [i.label for i in items] == [0, 1, 0, 2, 2]
    assert items[1].key == "s001"
    with items[3].open() as image:
        assert image.getpixel((0, 0))[0] > 100
    by_cls = eval_sources.open_eval_data(f"shards:{tmp_path}/val/*.tar", label_key="cls")
    assert by_cls.class_names == ["0", "1"]
    (tmp_path / "taxa.csv").write_text(TAXA_CSV)
    eval_sources.attach_taxa(data, str(tmp_path / "taxa.csv"))
    assert data.classes[0].taxon.common == "common raven" and data.classes[2].taxon is None
    found = eval_sources.open_eval_data(f"shards:{tmp_path}/val/*.tar")  # taxa.csv next to val/ is used
    assert found.classes[1].taxon.genus == "Passer"


def test_truncated_shard_keeps_what_it_can(tmp_path, capsys):
    _write_shards(tmp_path / "val", corrupt_tail=True)
    data = eval_sources.open_eval_data(f"shards:{tmp_path}/val/*.tar")
    assert 3 <= len(data) < 5
    assert "unreadable" in capsys.readouterr().err
    assert len(list(data.items())) == len(data)


def test_unprepared_tfds_dataset_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError, match="not available"):
        eval_sources.open_eval_data("tfds:oxford_flowers102:test", tfds_data_dir=str(tmp_path))
