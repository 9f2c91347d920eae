"""The tree-of-life text-embedding matrix, in pybioclip's file layout: reading a taxa catalog,
writing and reading the embeddings, and the cache of custom taxa.

Reads a catalog (TreeOfLife-10M's catalog.csv, or any CSV with kingdom .. species and
common columns; one row per image or per taxon), keeps each species once, and embeds its
name in one text type (default taxon_com: "Animalia ... Corvus corax with common name
common raven", the caption BioCLIP was trained on) through the 80 OpenAI templates.
Output, as pybioclip's TreeOfLifeClassifier reads it:

    DIR/txt_emb_species.npy   float32 [embed_dim, N], column i = taxon i (normalised)
    DIR/txt_emb_species.json  [[[kingdom, phylum, class, order, family, genus, epithet], common], ...]

The matrix is written column chunk by column chunk into a memory-mapped .npy, so memory
stays bounded for any number of taxa.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from bioclip_jax.compilation_cache import user_cache_dir
from bioclip_jax.inference import TextEmbedder
from bioclip_jax.models.clip import CLIP
from bioclip_jax.models.params import flat_params
from bioclip_jax.paths import as_path, atomic_local_file, expand_user, is_remote, open_text, write_atomically
from bioclip_jax.taxonomy import RANKS, Taxon, check_text_type, class_name
from bioclip_jax.taxonomy.templates import get_templates

EMBEDDINGS_FILE = "txt_emb_species.npy"
NAMES_FILE = "txt_emb_species.json"


def read_catalog_taxa(path: str, progress: bool = False) -> tuple[list[Taxon], int]:
    """Unique species of a catalog, in first-seen order, and how many rows were skipped.

    A row counts when it names a genus and an epithet; a species seen again only fills in a
    missing common name. Rows repeating an already seen spelling are not parsed again, so a
    10M-row catalog.csv costs about one pass of the CSV reader. `path` may be local or gs://.
    """
    if not as_path(path).is_file():
        raise FileNotFoundError(f"taxa catalog not found: {path}")
    found: dict[tuple, Taxon] = {}
    seen: dict[tuple, tuple | None] = {}  # raw spelling of the ranks -> normalised key (None: unusable)
    skipped = 0
    with open_text(path) as handle:
        reader = csv.DictReader(handle)
        header = {c.strip().lower(): c for c in reader.fieldnames or []}
        if not {"genus", "species"} <= set(header):
            raise ValueError(f"{path} needs at least genus and species columns (found {sorted(header)})")
        rank_columns = [header.get(rank) for rank in RANKS]
        common_column = header.get("common")
        for row in tqdm(reader, unit="row", desc="catalog", disable=not progress, file=sys.stderr):
            raw = tuple(row.get(c) if c else None for c in rank_columns)
            common = row.get(common_column) if common_column else None
            if raw in seen:
                key = seen[raw]
                if key is None:
                    skipped += 1
                if key is None or not common or found[key].common:
                    continue
            try:
                taxon = Taxon.from_mapping(row)
            except (TypeError, ValueError):
                taxon = None
            if taxon is None or not (taxon.genus and taxon.species):
                seen[raw] = None
                skipped += 1
                continue
            key = seen[raw] = taxon.ranks_tuple()
            known = found.get(key)
            if known is None or (not known.common and taxon.common):
                found[key] = taxon
    return list(found.values()), skipped


def names_entry(taxon: Taxon) -> list:
    """pybioclip's per-column name record."""
    return [list(taxon.ranks_tuple()), taxon.common]


def taxon_from_entry(entry: Sequence, where: str = NAMES_FILE) -> Taxon:
    try:
        ranks, common = entry
        return Taxon.from_ranks(**dict(zip(RANKS, ranks)), common=common or "")
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: bad name record {entry!r}; expected [[kingdom, ..., epithet], common]") from error


def taxa_class_chunks(model: CLIP, taxa: Sequence[Taxon], text_type: str = "taxon_com", *,
                      templates: str = "openai", batch_size: int = 2048, progress: bool = True) -> Iterator[np.ndarray]:
    """[n, D] embeddings of consecutive taxa, chunk by chunk."""
    check_text_type(text_type)
    names = (class_name(t, text_type) for t in taxa)
    embedder = TextEmbedder(model, batch_size=batch_size, progress=progress)
    return embedder.class_chunks(names, len(taxa), get_templates(templates), desc="taxa")


def write_taxa_embeddings(model: CLIP, taxa: Sequence[Taxon], out_dir: str, text_type: str = "taxon_com", *,
                          templates: str = "openai", batch_size: int = 2048, progress: bool = True) -> str:
    """Writes the two files; the .npy appears under its name only once complete."""
    if not taxa:
        raise ValueError("no taxa to embed")
    os.makedirs(out_dir, exist_ok=True)
    npy_path = os.path.join(out_dir, EMBEDDINGS_FILE)
    with atomic_local_file(npy_path) as temporary:
        matrix = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32,
                                           shape=(model.config.embed_dim, len(taxa)))
        column = 0
        for chunk in taxa_class_chunks(model, taxa, text_type, templates=templates, batch_size=batch_size,
                                       progress=progress):
            matrix[:, column:column + len(chunk)] = chunk.T
            column += len(chunk)
        matrix.flush()
        del matrix
    write_atomically(os.path.join(out_dir, NAMES_FILE), json.dumps([names_entry(t) for t in taxa]))
    return npy_path


def has_taxa_embeddings(directory: str | None) -> bool:
    return bool(directory) and (as_path(directory) / EMBEDDINGS_FILE).is_file()


def load_taxa_embeddings(directory: str) -> tuple[np.ndarray, list[Taxon]]:
    """([D, N] embeddings, N taxa) from an embed-taxa (or pybioclip) folder, local (memory-mapped) or gs://."""
    npy_path, json_path = os.path.join(directory, EMBEDDINGS_FILE), os.path.join(directory, NAMES_FILE)
    for path in (npy_path, json_path):
        if not as_path(path).is_file():
            raise FileNotFoundError(f"{path} not found; build it with: "
                                    f"bioclip-jax embed-taxa --taxa CSV --output {directory}")
    if is_remote(npy_path):
        with as_path(npy_path).open("rb") as handle:
            matrix = np.load(handle)
    else:
        matrix = np.load(expand_user(npy_path), mmap_mode="r")
    with open_text(json_path) as handle:
        entries = json.load(handle)
    if matrix.ndim != 2 or matrix.shape[1] != len(entries):
        raise ValueError(f"{npy_path} has shape {list(matrix.shape)} but {json_path} names {len(entries)} taxa; "
                         f"expected [embed_dim, {len(entries)}]")
    return matrix, [taxon_from_entry(e, json_path) for e in entries]


def taxa_cache_dir() -> str:
    """Where custom taxa embeddings are kept, one folder per (text tower, catalog, text type)."""
    return os.path.join(user_cache_dir(), "taxa_embeddings")


def _text_tower_digest(model: CLIP) -> str:
    """Fingerprint of everything a text embedding depends on (the text tower's weights)."""
    digest = hashlib.sha256()
    for path, value in sorted(flat_params(model).items(), key=lambda kv: str(kv[0])):
        if "visual" in str(path[0]) or "vision" in str(path[0]):
            continue
        digest.update(str(path).encode())
        digest.update(np.ascontiguousarray(np.asarray(value)).tobytes())
    return digest.hexdigest()[:16]


def cached_taxa_folder(model: CLIP, taxa_csv: str, text_type: str) -> str:
    """The cache folder of one (model, taxa file, text type)."""
    with as_path(taxa_csv).open("rb") as handle:
        catalog = hashlib.sha256(handle.read()).hexdigest()[:16]
    return os.path.join(taxa_cache_dir(), f"{_text_tower_digest(model)}-{catalog}-{text_type}")
