"""The seven TreeOfLife-10M caption types, spelt exactly as the dataset stores them.

Training mixes caption types so that any of them works as a query later; zero-shot
evaluation puts the bare class name of one type through prompt templates. Both come
from `class_name`, so a caption is always "a photo of " + class name + ".".
"""

from __future__ import annotations

from typing import Callable

from bioclip_jax.taxonomy.taxon import Taxon

TEXT_TYPES = ("sci", "com", "taxon", "taxonTag", "sci_com", "taxon_com", "taxonTag_com")

# What each type names a class by, in words (results files explain their text types with these).
TEXT_TYPE_MEANINGS = {
    "sci": "scientific name (Genus species)",
    "com": "common name (the scientific name where there is none)",
    "taxon": "taxonomic name, kingdom to species",
    "taxonTag": "taxonomic name with each rank tagged (kingdom X phylum Y ...)",
    "sci_com": "scientific name with common name",
    "taxon_com": "taxonomic name with common name (how the paper scores BioCLIP)",
    "taxonTag_com": "tagged taxonomic name with common name",
}

# The choices of the reference `--text_type random` (the tagged forms were never drawn).
RANDOM_POOL = ("sci", "com", "taxon", "sci_com", "taxon_com")

# Webdataset member extension -> text type, for the caption members of a sample.
CAPTION_FILES = {
    "sci.txt": "sci",
    "com.txt": "com",
    "taxon.txt": "taxon",
    "taxonTag.txt": "taxonTag",
    "sci_com.txt": "sci_com",
    "taxon_com.txt": "taxon_com",
    "taxonTag_com.txt": "taxonTag_com",
}

# The bare-name members stored next to the captions.
NAME_FILES = ("scientific_name.txt", "taxonomic_name.txt", "common_name.txt")

_BASE_NAMES: dict[str, Callable[[Taxon], str]] = {
    "sci": lambda taxon: taxon.scientific_name,
    "com": lambda taxon: taxon.common_or_fallback,
    "taxon": lambda taxon: taxon.taxonomic_name,
    "taxonTag": lambda taxon: taxon.tagged_name,
}


def check_text_type(text_type: str) -> str:
    """Returns `text_type` unchanged, or raises a ValueError that lists the valid names."""
    if text_type not in TEXT_TYPES:
        raise ValueError(f"unknown text type {text_type!r}; valid: {', '.join(TEXT_TYPES)}")
    return text_type


def class_name(taxon: Taxon, text_type: str) -> str:
    """The name of `taxon` in one text type, without the "a photo of ... ." wrapper."""
    check_text_type(text_type)
    if taxon.is_empty:
        raise ValueError(f"cannot name a taxon with no ranks (common name {taxon.common!r})")
    base, _, suffix = text_type.partition("_")
    name = _BASE_NAMES[base](taxon)
    if suffix == "com":
        name = f"{name} with common name {taxon.common_or_fallback}"
    return name


def caption(taxon: Taxon, text_type: str) -> str:
    """The training caption of `taxon`, identical to the TreeOfLife-10M `<type>.txt` member."""
    return f"a photo of {class_name(taxon, text_type)}."


def sample_captions(taxon: Taxon) -> dict[str, str]:
    """All text members of one TreeOfLife-10M webdataset sample, keyed by member extension.

    `common_name.txt` holds the raw common name and may be empty (the caption files
    already carry the fallback).
    """
    texts = {
        "scientific_name.txt": taxon.scientific_name,
        "taxonomic_name.txt": taxon.taxonomic_name,
        "common_name.txt": taxon.common,
    }
    texts.update({ext: caption(taxon, text_type) for ext, text_type in CAPTION_FILES.items()})
    return texts
