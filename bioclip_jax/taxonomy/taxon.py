"""One organism's taxonomy (kingdom .. species epithet) plus its common name.

The normalisation follows the one used to build TreeOfLife-10M, so that captions
rebuilt from catalog.csv match the strings stored in the webdataset shards:
higher ranks and the genus are capitalised ("Animalia", "Corvus"), the epithet is
lower case ("corax"), Metazoa is renamed Animalia and Archaeplastida /
Chloroplastida Plantae, and missing ranks are empty strings that every flattened
name simply leaves out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

# `class` is a Python keyword, so the dataclass field is `cls`.
_FIELDS = ("kingdom", "phylum", "cls", "order", "family", "genus", "species")

_KINGDOM_SYNONYMS = {
    "Metazoa": "Animalia",
    "Archaeplastida": "Plantae",
    "Chloroplastida": "Plantae",
}

# Values the source catalogues use for "not known"; treated like an empty cell.
_PLACEHOLDERS = frozenset(
    {"unknown", "(unidentified)", "unidentified", "not_classified", "pleasehelp", "nan", "none", "null"}
)


def _clean_text(value: Any, what: str) -> str:
    """Strips and collapses whitespace; None, NaN (pandas' empty cell) and placeholders give ""."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if not isinstance(value, str):
        raise TypeError(f"taxon {what} must be a string, got {type(value).__name__} {value!r}")
    text = " ".join(value.split())
    return "" if text.lower() in _PLACEHOLDERS else text


def _normalise(ranks: dict[str, str]) -> dict[str, str]:
    """Applies the TreeOfLife-10M spelling rules to already-cleaned rank strings."""
    out = {name: value.capitalize() for name, value in ranks.items() if name != "species"}
    out["kingdom"] = _KINGDOM_SYNONYMS.get(out["kingdom"], out["kingdom"])
    words = ranks["species"].split()
    if len(words) >= 2 and words[0].capitalize() == out["genus"]:
        words = words[1:]  # "Corvus corax" given as the epithet of genus Corvus
    elif len(words) >= 2 and not out["genus"] and words[0][:1].isupper():
        out["genus"] = words[0].capitalize()  # binomial given with the genus column empty
        words = words[1:]
    out["species"] = " ".join(words).lower()
    return out


@dataclasses.dataclass(frozen=True)
class Taxon:
    """A normalised taxonomy; every constructor path normalises, so equal organisms compare equal."""

    kingdom: str = ""
    phylum: str = ""
    cls: str = ""
    order: str = ""
    family: str = ""
    genus: str = ""
    species: str = ""  # the epithet only, e.g. "corax"
    common: str = ""

    def __post_init__(self) -> None:
        cleaned = {
            field: _clean_text(getattr(self, field), "class" if field == "cls" else field)
            for field in _FIELDS
        }
        normalised = _normalise(cleaned)
        for field in _FIELDS:
            object.__setattr__(self, field, normalised[field])
        object.__setattr__(self, "common", _clean_text(self.common, "common name"))

    @classmethod
    def from_ranks(taxon_type, **ranks: Any) -> "Taxon":  # not `cls`: that is a rank here
        """Keyword constructor that also accepts `**{"class": ...}` for the class rank."""
        if "class" in ranks:
            if "cls" in ranks:
                raise ValueError("give the class rank as either 'class' or 'cls', not both")
            ranks["cls"] = ranks.pop("class")
        unknown = sorted(set(ranks) - set(_FIELDS) - {"common"})
        if unknown:
            raise ValueError(f"unknown taxon field(s) {unknown}; valid: {list(RANKS) + ['cls', 'common']}")
        return taxon_type(**ranks)

    @classmethod
    def from_mapping(taxon_type, row: Mapping[str, Any]) -> "Taxon":
        """Reads a catalog.csv-style row; other columns are ignored, absent ones count as missing."""
        lowered = {str(key).strip().lower(): value for key, value in row.items()}
        ranks = {
            field: lowered.get(rank, lowered.get(field, "")) for rank, field in zip(RANKS, _FIELDS)
        }
        return taxon_type(**ranks, common=lowered.get("common", ""))

    def ranks_tuple(self) -> tuple[str, str, str, str, str, str, str]:
        """The seven ranks, kingdom first, "" where missing."""
        return tuple(getattr(self, field) for field in _FIELDS)  # type: ignore[return-value]

    def lineage(self, rank: str) -> tuple[str, ...]:
        """Ranks from kingdom down to `rank`, "" kept in place, so lineages compare position by position."""
        key = "class" if rank == "cls" else rank
        if key not in RANKS:
            raise ValueError(f"unknown rank {rank!r}; valid: {list(RANKS)}")
        return self.ranks_tuple()[: RANKS.index(key) + 1]

    @property
    def is_empty(self) -> bool:
        """True when no rank is known (a common name alone does not place an organism in the tree)."""
        return not any(self.ranks_tuple())

    @property
    def scientific_name(self) -> str:
        """"Genus species", "Genus" without an epithet, else the lowest rank present."""
        if self.genus:
            return f"{self.genus} {self.species}".strip()
        present = [name for name in self.ranks_tuple() if name]
        return present[-1] if present else ""

    @property
    def taxonomic_name(self) -> str:
        """"Kingdom Phylum Class Order Family Genus species" with missing ranks left out."""
        return " ".join(name for name in self.ranks_tuple() if name)

    @property
    def tagged_name(self) -> str:
        """"kingdom Animalia phylum Chordata ... species corax" with missing ranks left out."""
        return " ".join(f"{rank} {name}" for rank, name in zip(RANKS, self.ranks_tuple()) if name)

    @property
    def common_or_fallback(self) -> str:
        """The common name; TreeOfLife-10M falls back to the scientific, then the taxonomic name."""
        return self.common or self.scientific_name or self.taxonomic_name
