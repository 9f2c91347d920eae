"""Taxonomy records, the TreeOfLife-10M caption types, and how training mixes them."""

from bioclip_jax.taxonomy.mixing import MODES, TextTypeSampler
from bioclip_jax.taxonomy.taxon import RANKS, Taxon
from bioclip_jax.taxonomy.text_types import (
    CAPTION_FILES,
    NAME_FILES,
    RANDOM_POOL,
    TEXT_TYPES,
    caption,
    check_text_type,
    class_name,
    sample_captions,
)

__all__ = [
    "CAPTION_FILES",
    "MODES",
    "NAME_FILES",
    "RANDOM_POOL",
    "RANKS",
    "TEXT_TYPES",
    "Taxon",
    "TextTypeSampler",
    "caption",
    "check_text_type",
    "class_name",
    "sample_captions",
]
