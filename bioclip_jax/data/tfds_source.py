"""A TFDS image-classification dataset whose classes are taxa (iNaturalist 2021) as a training source.

    open_tfds_source("i_naturalist2021:mini")           NAME[:SPLIT] (default split: train)
    open_tfds_source("i_naturalist2021:train?taxa=/data/inat21/train.json&data_dir=/data/tfds")

Examples are read by `tfds.data_source` (ArrayRecord, random access, no TensorFlow needed), so
Grain shuffles them globally as it does tar shards. `source[i]` is a raw sample in the form of
`TarShardSource`: {"__key__", "__shard__": 0, "jpg": the stored image bytes, and the ten caption
members of a TreeOfLife-10M sample}, made from the example's class by `sample_captions`.

What TFDS 4.9's `i_naturalist2021` builder (version 2.0.1) stores, read from its source: features
`id` (int64), `file_id` (text), `image` (Image), `label` (ClassLabel, 10,000 names) and
`supercategory` (ClassLabel, 11 names); supervised keys (image, label). Its class names are
NOT the full taxonomy: each is the `name` of the iNat21 category ("Ameiurus nebulosus")
lower-cased with "_" for " ", e.g. "ameiurus_nebulosus". From the label alone a caption knows the
genus and epithet only (sci and taxon reduce to the binomial, com falls back to it). The
competition's own train.json / train_mini.json (`categories` carry kingdom .. specific_epithet and
common_name) or a taxa.csv, given as `taxa=`, supply the full taxonomy and common name of every
class. Class names that already are a taxonomy (the iNat21 directory name
"02912_Animalia_Chordata_..._Ameiurus_nebulosus") are read rank by rank.
"""

from __future__ import annotations

import io
import json
import urllib.parse
from typing import Any

import numpy as np
from PIL import Image

from bioclip_jax.data.eval_sources import name_key as taxa_key
from bioclip_jax.data.eval_sources import tfds_keys, read_taxa_lookup
from bioclip_jax.data.tar_source import UNREADABLE_SHARD, error_sample
from bioclip_jax.paths import as_path, open_text
from bioclip_jax.taxonomy import RANKS, Taxon, sample_captions

DEFAULT_SPLIT = "train"
OPTIONS = ("taxa", "data_dir")
JPEG_QUALITY = 95


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """"NAME[:SPLIT][?taxa=PATH&data_dir=PATH]" -> (name, split, options)."""
    body, _, query = spec.partition("?")
    name, _, split = body.partition(":")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(OPTIONS))
    if not name or unknown:
        raise ValueError(f"TFDS source {spec!r}: expected NAME[:SPLIT][?taxa=PATH&data_dir=PATH]"
                         + (f"; unknown option(s) {', '.join(unknown)}" if unknown else ""))
    return name, split or DEFAULT_SPLIT, options


def taxon_from_label(label: str) -> Taxon:
    """A class name as a taxon: "ameiurus_nebulosus" (Genus epithet), or a full
    "[NNNNN_]Kingdom_Phylum_Class_Order_Family_Genus_epithet"; a single word is a genus."""
    words = label.replace("_", " ").split()
    if words and words[0].isdigit():
        words = words[1:]  # the iNat21 category number
    if len(words) >= len(RANKS):
        return Taxon(*words[:len(RANKS) - 1], species=" ".join(words[len(RANKS) - 1:]))
    if not words:
        raise ValueError(f"class name {label!r} names no taxon")
    return Taxon(genus=words[0], species=" ".join(words[1:]))


def read_inat_categories(path: str) -> dict[str, Taxon]:
    """Scientific-name key -> Taxon from an iNat21 annotation JSON's `categories`."""
    with open_text(path) as handle:
        categories = json.load(handle).get("categories")
    if not isinstance(categories, list):
        raise ValueError(f"{path} has no 'categories' list (expected an iNat21 train.json or train_mini.json)")
    lookup = {}
    for category in categories:
        taxon = Taxon.from_ranks(**{rank: category.get(rank, "") for rank in RANKS[:-1]},
                                 species=category.get("specific_epithet", ""), common=category.get("common_name", ""))
        lookup[taxa_key(category.get("name") or taxon.scientific_name)] = taxon
    return lookup


def read_taxa(path: str) -> dict[str, Taxon]:
    """Name key -> Taxon from an iNat21 JSON or a taxa.csv (matched as eval folders are)."""
    if not as_path(path).is_file():
        raise FileNotFoundError(f"taxa file not found: {path}")
    return read_inat_categories(path) if path.endswith(".json") else read_taxa_lookup(path)


def class_taxa(names: list[str], lookup: dict[str, Taxon] | None = None) -> list[Taxon]:
    """Each class's taxon: from the lookup when one is given, else parsed from the class name.

    A class the lookup misses is an error naming it: silently shorter captions for some
    classes would make them look different to the model for no biological reason.
    """
    taxa = []
    for name in names:
        if lookup is None:
            taxa.append(taxon_from_label(name))
            continue
        taxon = lookup.get(taxa_key(name)) or lookup.get(taxa_key(taxon_from_label(name).scientific_name))
        if taxon is None:
            raise ValueError(f"class {name!r} is not in the taxa file ({len(lookup)} names); give the file of "
                             f"the same dataset version")
        taxa.append(taxon)
    return taxa


def _image_bytes(value: Any) -> bytes:
    """The stored (encoded) image; a decoded array (a source that decodes anyway) is encoded as JPEG."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.item()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value)
    pixels = np.asarray(value, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[-1] == 1 else pixels).convert("RGB").save(
        buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


class TfdsSampleSource:
    """Random access to a TFDS split as raw captioned samples (see the module docstring).

    Pickled into a Grain worker process it carries its spec, not TFDS's reader, and reopens the
    split there on first use (through `_builder`'s fallback, which the reader's own pickling lacks).
    """

    def __init__(self, spec: str, data_source, image_key: str, label_key: str, taxa: list[Taxon]):
        self.spec, self.data_source = spec, data_source
        self.image_key, self.label_key = image_key, label_key
        self.name = spec.partition("?")[0]
        self.captions = [{ext: text.encode("utf-8") for ext, text in sample_captions(taxon).items()}
                         for taxon in taxa]
        self._length = len(data_source)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples")
        if self.data_source is None:
            self.data_source = _open_split(self.spec, self.image_key)
        key = f"{self.name.replace(':', '-')}-{index}"
        try:
            record = self.data_source[index]
        except Exception as error:  # noqa: BLE001 - a bad record is skipped and counted, as a bad tar sample is
            return error_sample(key, 0, UNREADABLE_SHARD, f"cannot read {self.name} example {index}: {error}")
        return {"__key__": key, "__shard__": 0, "jpg": _image_bytes(record[self.image_key]),
                **self.captions[int(record[self.label_key])]}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "data_source": None}

    def __repr__(self) -> str:
        return f"TfdsSampleSource({self.name}, {len(self)} samples)"


def open_tfds_source(spec: str) -> TfdsSampleSource:
    """Opens `NAME[:SPLIT][?taxa=PATH&data_dir=PATH]` (see the module docstring)."""
    import tensorflow_datasets as tfds  # noqa: PLC0415 - only this source needs it

    name, _, options = parse_spec(spec)
    builder, _ = _builder(tfds, name, options.get("data_dir") or None)
    image_key, label_key = tfds_keys(name, builder.info)
    lookup = read_taxa(options["taxa"]) if options.get("taxa") else None
    taxa = class_taxa(list(builder.info.features[label_key].names), lookup)
    return TfdsSampleSource(spec, _open_split(spec, image_key), image_key, label_key, taxa)


def _open_split(spec: str, image_key: str):
    """TFDS's random-access reader of the split, giving the stored image bytes undecoded."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    name, split, options = parse_spec(spec)
    data_dir = options.get("data_dir") or None
    builder, from_code = _builder(tfds, name, data_dir)
    decoders = {image_key: tfds.decode.SkipDecoding()}  # decoded once, by the pipeline's crop
    try:
        if from_code:
            return tfds.data_source(name, split=split, data_dir=data_dir, decoders=decoders)
        return builder.as_data_source(split=split, decoders=decoders)
    except Exception as error:  # TFDS raises several types for "not prepared"
        raise FileNotFoundError(f"TFDS dataset {name}:{split} is not prepared as ArrayRecord in "
                                f"{data_dir or '~/tensorflow_datasets (or $TFDS_DATA_DIR)'} (prepare it with "
                                f"`tfds build {name} --file_format=array_record`): {error}") from error


def _builder(tfds, name: str, data_dir: str | None):
    """(builder, whether from its code): from the code or, where that fails, from the prepared files.

    TFDS 4.9.10's wheel lacks i_naturalist2021_labels_ordered_by_json_id.txt, so the builder
    class cannot even describe its features; a prepared copy carries its own label names.
    """
    try:
        return tfds.builder(name, data_dir=data_dir), True
    except Exception as code_error:  # noqa: BLE001
        try:
            return tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir), False
        except Exception:  # noqa: BLE001 - the first error says more
            raise FileNotFoundError(f"TFDS dataset {name!r} cannot be opened from its code nor found prepared in "
                                    f"{data_dir or '~/tensorflow_datasets (or $TFDS_DATA_DIR)'}: {code_error}") \
                from code_error
