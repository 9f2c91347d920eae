"""TFDS iNaturalist 2021 as a training source: class names -> TreeOfLife captions, random access for Grain.

The mock runs TFDS's real `i_naturalist2021` builder (features, supervised keys, label
format) under `tfds.testing.mock_data`, with two stand-ins for what this machine lacks:
the label-names file the TFDS 4.9.10 wheel does not ship (three names written in the
builder's own format, from its dummy data), and TensorFlow, which the mock would use to
encode its random images (TFDS's PIL encoder does it instead).
"""

import json
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core.features import image_feature

from bioclip_jax.data import decode, tfds_source
from bioclip_jax.data.pipeline import make_train_dataset
from bioclip_jax.data.tfds_source import open_tfds_source, parse_spec, taxon_from_label
from bioclip_jax.taxonomy import Taxon, sample_captions

# The categories of TFDS's dummy iNat21 train.json, as the competition JSON spells them.
CATEGORIES = [
    {"id": 0, "name": "Ameiurus nebulosus", "common_name": "Brown Bullhead Catfish", "kingdom": "Animalia",
     "phylum": "Chordata", "class": "Actinopterygii", "order": "Siluriformes", "family": "Ictaluridae",
     "genus": "Ameiurus", "specific_epithet": "nebulosus", "supercategory": "Ray-finned Fishes"},
    {"id": 1, "name": "Marmota flaviventris", "common_name": "Yellow-bellied Marmot", "kingdom": "Animalia",
     "phylum": "Chordata", "class": "Mammalia", "order": "Rodentia", "family": "Sciuridae",
     "genus": "Marmota", "specific_epithet": "flaviventris", "supercategory": "Mammals"},
    {"id": 2, "name": "Dipsosaurus dorsalis", "common_name": "Desert Iguana", "kingdom": "Animalia",
     "phylum": "Chordata", "class": "Reptilia", "order": "Squamata", "family": "Iguanidae",
     "genus": "Dipsosaurus", "specific_epithet": "dorsalis", "supercategory": "Reptiles"},
]
# The builder's ClassLabel names: the category name lower-cased, "_" for " " (its `_format`).
LABEL_NAMES = [c["name"].lower().replace(" ", "_") for c in CATEGORIES]
EXAMPLES = 8


@pytest.fixture
def inat21_mock(tmp_path, monkeypatch):
    labels = tmp_path / "i_naturalist2021_labels_ordered_by_json_id.txt"
    labels.write_text("\n".join(LABEL_NAMES) + "\n")
    real_path = tfds.core.tfds_path

    def tfds_path(*parts):
        path = real_path(*parts)
        return labels if str(path).endswith(labels.name) else path

    monkeypatch.setattr(tfds.core, "tfds_path", tfds_path)
    monkeypatch.setattr(image_feature._ImageEncoder, "_encode_image",
                        lambda self, pixels: self._encode_pil_image(image_feature.PIL_Image.fromarray(pixels)))
    categories = tmp_path / "train_mini.json"
    categories.write_text(json.dumps({"categories": CATEGORIES, "images": [], "annotations": []}))
    with tfds.testing.mock_data(num_examples=EXAMPLES):
        yield str(categories)


def _taxon(category) -> Taxon:
    return Taxon.from_ranks(**{r: category[r] for r in ("kingdom", "phylum", "class", "order", "family", "genus")},
                            species=category["specific_epithet"], common=category["common_name"])


def test_inat21_examples_become_captioned_samples_with_the_full_taxonomy(inat21_mock):
    source = open_tfds_source(f"i_naturalist2021:mini?taxa={inat21_mock}")
    assert len(source) == EXAMPLES
    every = {_taxon(c).taxonomic_name: _taxon(c) for c in CATEGORIES}
    seen = set()
    for i in range(len(source)):
        sample = source[i]
        taxon = every[sample["taxonomic_name.txt"].decode()]
        assert {k: v for k, v in sample.items() if k.endswith(".txt")} == \
            {ext: text.encode() for ext, text in sample_captions(taxon).items()}
        assert decode.decode_and_crop(sample["jpg"], 16, np.random.default_rng(0)).shape == (16, 16, 3)
        seen.add(taxon.taxonomic_name)
    assert source[3] == source[3] and len(seen) > 1  # random access, deterministic
    assert b"a photo of Animalia Chordata" in source[0]["taxon.txt"]


def test_without_a_taxa_file_captions_hold_the_binomial_of_the_label(inat21_mock):
    source = open_tfds_source("i_naturalist2021:mini")
    names = {source[i]["sci.txt"].decode() for i in range(len(source))}
    assert names <= {f"a photo of {c['name']}." for c in CATEGORIES}
    assert source[0]["taxon.txt"] == source[0]["sci.txt"]  # the labels carry no higher ranks


def test_grain_pipeline_batches_the_tfds_source(inat21_mock):
    """In this process (worker processes would not see the mock); a pickled source reopens its split."""
    source = open_tfds_source(f"i_naturalist2021:mini?taxa={inat21_mock}")
    dataset = make_train_dataset(source, global_batch_size=4, seed=0, text_type="taxon_com",
                                 tokenizer="ViT-Tiny-8", image_size=32, worker_count=0)
    batch = next(iter(dataset))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["tokens"].shape == (4, 77)
    assert batch["skipped"].sum() == 0
    copy = pickle.loads(pickle.dumps(source))
    assert copy.data_source is None and copy[5] == source[5]


def test_class_names_and_specs():
    assert taxon_from_label("ameiurus_nebulosus") == Taxon(genus="Ameiurus", species="nebulosus")
    assert taxon_from_label("zygiella_x-notata").scientific_name == "Zygiella x-notata"
    full = taxon_from_label("02912_Animalia_Chordata_Actinopterygii_Siluriformes_Ictaluridae_Ameiurus_nebulosus")
    assert full.taxonomic_name == "Animalia Chordata Actinopterygii Siluriformes Ictaluridae Ameiurus nebulosus"
    assert parse_spec("i_naturalist2021") == ("i_naturalist2021", "train", {})
    assert parse_spec("i_naturalist2021:val?data_dir=/d&taxa=/t.json") == \
        ("i_naturalist2021", "val", {"data_dir": "/d", "taxa": "/t.json"})
    with pytest.raises(ValueError, match="unknown option"):
        parse_spec("i_naturalist2021:val?labels=x")
    decoded = np.full((6, 5, 3), 200, np.uint8)  # a dataset whose images arrive decoded is re-encoded
    assert decode.decode_and_crop(tfds_source._image_bytes(decoded), 4, np.random.default_rng(0)).mean() > 150


def test_a_class_missing_from_the_taxa_file_is_named(inat21_mock, tmp_path):
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"categories": CATEGORIES[:2]}))
    with pytest.raises(ValueError, match="class 'dipsosaurus_dorsalis' is not in the taxa file"):
        open_tfds_source(f"i_naturalist2021:mini?taxa={partial}")
