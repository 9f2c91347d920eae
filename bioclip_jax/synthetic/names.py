"""Names for the synthetic tree of life: Latin-looking taxa and pattern-following common names.

Real names carry information the text tower can use: rank suffixes tell the rank and
the kingdom ("-idae" is an animal family, "-aceae" a plant or fungus one), epithets
describe a trait ("rubra" = red), and common names combine a trait adjective with a
group noun ("Red-patched Marsh Wren"). The generator keeps those regularities so
that a model can reach unseen species through shared words, as BioCLIP does.
"""

from __future__ import annotations

import dataclasses

import numpy as np

KINGDOMS = ("Animalia", "Plantae", "Fungi", "Chromista", "Protozoa", "Bacteria", "Archaea")


@dataclasses.dataclass(frozen=True)
class EpithetTrait:
    """A species epithet, the visible trait it names and the adjective of its common name."""

    epithet: str
    trait: str
    adjective: str


# Feminine forms throughout: every generated genus name has a feminine ending.
EPITHET_TRAITS = (
    EpithetTrait("rubra", "red_patch", "Red-patched"),
    EpithetTrait("striata", "stripes", "Striped"),
    EpithetTrait("maculata", "spots", "Spotted"),
    EpithetTrait("alba", "white", "White"),
    EpithetTrait("nigra", "black", "Black"),
    EpithetTrait("caudata", "tail", "Long-tailed"),
    EpithetTrait("cornuta", "horns", "Horned"),
    EpithetTrait("ocellata", "eyespots", "Eyed"),
    EpithetTrait("lutea", "yellow", "Yellow"),
    EpithetTrait("gigantea", "giant", "Giant"),
    EpithetTrait("minima", "tiny", "Least"),
    EpithetTrait("marginata", "border", "Bordered"),
    EpithetTrait("alata", "wings", "Winged"),
    EpithetTrait("setosa", "bristles", "Bristly"),
    EpithetTrait("fasciata", "band", "Banded"),
    EpithetTrait("cristata", "crest", "Crested"),
)
EPITHETS = {entry.epithet: entry for entry in EPITHET_TRAITS}

# Rank suffixes by kingdom, modelled on the real nomenclature codes.
_SUFFIXES = {
    "phylum": {
        "Animalia": ("poda", "ata", "zoa", "ida"), "Plantae": ("phyta",), "Fungi": ("mycota",),
        "Chromista": ("phyta", "ozoa"), "Protozoa": ("ozoa",), "Bacteria": ("ota",),
        "Archaea": ("archaeota",),
    },
    "class": {
        "Animalia": ("ia", "ea", "oda"), "Plantae": ("opsida",), "Fungi": ("mycetes",),
        "Chromista": ("phyceae",), "Protozoa": ("ea",), "Bacteria": ("bacteria",),
        "Archaea": ("ia",),
    },
    "order": {
        "Animalia": ("iformes", "ida", "optera"), "Plantae": ("ales",), "Fungi": ("ales",),
        "Chromista": ("ales",), "Protozoa": ("ida",), "Bacteria": ("ales",), "Archaea": ("ales",),
    },
    "family": {"Animalia": ("idae",), "Protozoa": ("idae",)},  # everything else: "aceae"
    "genus": {},  # every kingdom: the feminine endings below
}
_DEFAULT_SUFFIX = {"family": ("aceae",), "genus": ("a", "ia", "ella", "ina", "opsis", "ula", "ea")}

_ONSETS = ("b", "c", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "ch", "ph", "th",
           "pr", "st", "tr", "cl", "gl", "sp", "rh", "x", "z")
_VOWELS = ("a", "e", "i", "o", "u", "y", "ae", "au")
_CODAS = ("", "", "", "", "n", "r", "s", "l", "m")

# Group nouns for common names, by kingdom; a family gets one, a genus a qualifier.
_GROUP_NOUNS = {
    "Animalia": ("Wren", "Beetle", "Frog", "Moth", "Snail", "Finch", "Lizard", "Crab", "Newt",
                 "Shrew", "Darter", "Weevil", "Gecko", "Plover", "Mantis", "Toad", "Warbler",
                 "Skink", "Shrimp", "Vole"),
    "Plantae": ("Fern", "Sedge", "Lily", "Moss", "Thistle", "Orchid", "Aster", "Clover",
                "Rush", "Sorrel", "Vetch", "Mallow", "Poppy", "Heath", "Reed", "Violet"),
    "Fungi": ("Bolete", "Puffball", "Bracket", "Cup", "Morel", "Milkcap", "Webcap",
              "Earthstar", "Jelly", "Truffle", "Funnel", "Parasol"),
    "Chromista": ("Kelp", "Wrack", "Diatom", "Mould", "Weed", "Lace", "Tuft", "Frond"),
    "Protozoa": ("Amoeba", "Slime", "Ciliate", "Bell", "Trumpet", "Sun", "Shell", "Drop"),
    "Bacteria": ("Rod", "Coccus", "Spiral", "Chain", "Film", "Filament", "Comma", "Mat"),
    "Archaea": ("Vent", "Salt", "Spring", "Crust", "Disc", "Square", "Lobe", "Pan"),
}
_QUALIFIERS = ("Marsh", "Rock", "Forest", "Desert", "Reef", "Cave", "Meadow", "River", "Dune",
               "Alpine", "Coastal", "Bog", "Valley", "Island", "Canyon", "Prairie", "Tundra",
               "Lagoon", "Cliff", "Steppe", "Delta", "Glacier", "Savanna", "Moor")


class NameGenerator:
    """Draws names that are unique across the whole tree, deterministically from `rng`."""

    def __init__(self, rng: np.random.Generator):
        self._rng = rng
        self._used: set[str] = {entry.epithet for entry in EPITHET_TRAITS}
        self._used_nouns: dict[str, set[str]] = {}

    def latin(self, rank: str, kingdom: str) -> str:
        """A capitalised name whose suffix marks `rank` (phylum .. genus) in `kingdom`."""
        suffixes = _SUFFIXES[rank].get(kingdom) or _DEFAULT_SUFFIX[rank]
        for attempt in range(1000):
            syllables = 2 + (attempt > 200) + int(self._rng.uniform() < 0.3)
            stem = "".join(self._syllable(last=i == syllables - 1) for i in range(syllables))
            suffix = self._pick(suffixes)
            if suffix[0] in "aeiouy":
                stem = stem.rstrip("aeiouy")  # "Gleti" + "ia" -> "Gletia", not "Gletiia"
            name = (stem + suffix).capitalize()
            if name not in self._used and len(name) <= 20:
                self._used.add(name)
                return name
        raise RuntimeError(f"could not draw a new {rank} name after 1000 tries")

    def group_noun(self, kingdom: str) -> str:
        """A common noun for a family ("Wren"); once a kingdom's list runs out, compounds ("Wren-Moth")."""
        nouns = _GROUP_NOUNS[kingdom]
        used = self._used_nouns.setdefault(kingdom, set())
        fresh = [noun for noun in nouns if noun not in used]
        if not fresh:
            fresh = [f"{a}-{b}" for a in nouns for b in nouns if a != b and f"{a}-{b}" not in used]
        noun = self._pick(fresh)
        used.add(noun)
        return noun

    def genus_common_noun(self, family_noun: str, taken: set[str]) -> str:
        """A genus-level common noun, a qualifier plus the family noun ("Marsh Wren"), new within `taken`."""
        fresh = [f"{q} {family_noun}" for q in _QUALIFIERS if f"{q} {family_noun}" not in taken]
        if not fresh:
            fresh = [f"{a} {b} {family_noun}" for a in _QUALIFIERS for b in _QUALIFIERS
                     if a != b and f"{a} {b} {family_noun}" not in taken]
        return self._pick(fresh)

    def _syllable(self, last: bool) -> str:
        coda = "" if last else self._pick(_CODAS)
        return self._pick(_ONSETS) + self._pick(_VOWELS) + coda

    def _pick(self, options):
        return options[int(self._rng.integers(0, len(options)))]


def common_name(epithet: str, genus_noun: str) -> str:
    """"<trait adjective> <genus noun>", e.g. "Striped Marsh Wren"."""
    return f"{EPITHETS[epithet].adjective} {genus_noun}"
