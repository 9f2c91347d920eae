"""The random taxonomy behind the synthetic dataset, with looks inherited down the tree.

The tree is grown top-down: genera are spread over kingdoms, then split into phyla,
classes, orders and families; each node draws its name and the visual traits of its
rank (see images.py), and children inherit the rest. Species are genus x
epithet, epithets balanced over the whole tree so that every trait is seen on many
genera. Held-out species are chosen so that zero-shot is possible only through the
taxonomy: each keeps training relatives in its genus and its epithet stays in
training on other genera.
"""

from __future__ import annotations

import colorsys
import dataclasses
import math

import numpy as np

from bioclip_jax.synthetic.images import PATTERNS, Looks
from bioclip_jax.synthetic.names import EPITHET_TRAITS, KINGDOMS, NameGenerator, common_name
from bioclip_jax.taxonomy import Taxon

SPECIES_PER_GENUS = 5  # on average; at least 2 so that a genus can lose one to the held-out set

# Kingdom -> (background top, background bottom, body plan).
_KINGDOM_LOOKS = {
    "Animalia": ((222, 205, 170), (188, 162, 118), "animal"),
    "Plantae": ((182, 212, 236), (146, 186, 136), "plant"),
    "Fungi": ((112, 92, 66), (82, 64, 44), "fungus"),
    "Chromista": ((42, 98, 112), (20, 56, 76), "cell"),
    "Protozoa": ((226, 221, 241), (199, 194, 226), "cell"),
    "Bacteria": ((236, 214, 220), (214, 188, 200), "rod"),
    "Archaea": ((232, 182, 122), (202, 142, 82), "rod"),
}
# Body plan -> (aspect range, limb choices) drawn per phylum.
_PHYLUM_SHAPES = {
    "animal": ((1.2, 1.9), (0, 2, 3, 4)),
    "plant": ((0.9, 1.2), (0, 2, 4)),
    "fungus": ((1.4, 1.9), (0, 1, 2)),
    "cell": ((1.0, 1.35), (0, 1, 2, 3)),
    "rod": ((2.0, 2.7), (0, 1, 2, 4)),
}
# Body plan -> (lobe counts, lobe depth range) drawn per class.
_CLASS_SHAPES = {
    "animal": ((0, 6, 8), (0.05, 0.12)),
    "plant": ((4, 5, 6, 7, 8), (0.2, 0.4)),
    "fungus": ((0, 10, 14), (0.04, 0.08)),
    "cell": ((0, 7, 11), (0.05, 0.12)),
    "rod": ((0,), (0.0, 0.0)),
}
_BODY_HUES = (80.0, 330.0)  # degrees; red and yellow stay free for "rubra" and "lutea"
_LOWER_RANKS = ("phylum", "class", "order", "family")


@dataclasses.dataclass(frozen=True)
class SyntheticSpecies:
    """One species of the synthetic tree: its index, taxon, looks and whether it is held out."""

    index: int
    taxon: Taxon
    looks: Looks
    held_out: bool

    @property
    def epithet(self) -> str:
        return self.taxon.species


@dataclasses.dataclass
class _Genus:
    lineage: dict[str, str]  # kingdom .. genus names
    traits: dict  # Looks fields fixed so far
    common_noun: str


def build_species(n_species: int, held_out: float | int, seed: int) -> list[SyntheticSpecies]:
    """The whole synthetic taxonomy for a seed; `held_out` is a fraction (< 1) or a count."""
    if isinstance(n_species, bool) or not isinstance(n_species, (int, np.integer)) or n_species < 1:
        raise ValueError(f"the synthetic tree needs a whole number of species >= 1, got {n_species!r}")
    rng = np.random.default_rng([seed, 0])
    namer = NameGenerator(rng)
    n_genera = max(1, round(n_species / SPECIES_PER_GENUS)) if n_species >= 4 else 1
    sizes = _species_per_genus(n_species, n_genera, rng)
    n_kingdoms = min(len(KINGDOMS), n_genera, 3 + n_genera // 40)
    genera: list[_Genus] = []
    for kingdom, count in zip(KINGDOMS, _split(n_genera, n_kingdoms, rng)):
        top, bottom, plan = _KINGDOM_LOOKS[kingdom]
        traits = {"background": (top, bottom), "body_plan": plan}
        genera += _grow({"kingdom": kingdom}, traits, 0, count, rng, namer)
    _spread_order_hues(genera, rng)
    species = _name_species(genera, sizes, rng)
    return _hold_out(species, _held_out_count(held_out, n_species), rng)


def _species_per_genus(n_species: int, n_genera: int, rng) -> list[int]:
    sizes = np.full(n_genera, min(2, n_species // n_genera))
    cap = len(EPITHET_TRAITS)
    for _ in range(n_species - int(sizes.sum())):
        open_genera = np.flatnonzero(sizes < cap)
        sizes[rng.choice(open_genera)] += 1
    return [int(size) for size in sizes]


def _split(n: int, parts: int, rng) -> list[int]:
    """`n` items into `parts` non-empty groups of random sizes."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=parts - 1, replace=False)) if parts > 1 else []
    bounds = [0, *[int(cut) for cut in cuts], n]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def _grow(lineage: dict, traits: dict, level: int, n_genera: int, rng, namer) -> list[_Genus]:
    """Splits `n_genera` genera under one node into children of the next rank, recursively."""
    kingdom = lineage["kingdom"]
    if level == len(_LOWER_RANKS):
        return _make_genera(lineage, traits, n_genera, rng, namer)
    rank = _LOWER_RANKS[level]
    levels_left = len(_LOWER_RANKS) - level + 1  # the genus level counts too
    children = int(np.clip(round(n_genera ** (1.0 / levels_left) + rng.uniform(-0.5, 0.5)), 1, n_genera))
    genera = []
    for count in _split(n_genera, children, rng):
        child_lineage = {**lineage, rank: namer.latin(rank, kingdom)}
        child_traits = {**traits, **_rank_traits(rank, traits, rng)}
        genera += _grow(child_lineage, child_traits, level + 1, count, rng, namer)
    return genera


def _rank_traits(rank: str, inherited: dict, rng) -> dict:
    """The looks a node of `rank` fixes for everything below it."""
    plan = inherited["body_plan"]
    if rank == "phylum":
        (low, high), limbs = _PHYLUM_SHAPES[plan]
        return {"aspect": float(rng.uniform(low, high)), "limbs": int(rng.choice(limbs))}
    if rank == "class":
        lobe_choices, (low, high) = _CLASS_SHAPES[plan]
        lobes = int(rng.choice(lobe_choices))
        return {
            "lobes": lobes,
            "lobe_depth": float(rng.uniform(low, high)) if lobes else 0.0,
            "aspect": inherited["aspect"] * float(rng.uniform(0.9, 1.1)),
        }
    if rank == "order":
        return {}  # its hue is spread over all orders afterwards (_spread_order_hues)
    # family: a palette around the order's hue
    return {"family_shift": float(rng.uniform(-18.0, 18.0)),
            "saturation": float(rng.uniform(0.35, 0.7)), "value": float(rng.uniform(0.45, 0.75))}


def _make_genera(lineage: dict, traits: dict, count: int, rng, namer) -> list[_Genus]:
    """The genera of one family: distinct patterns and group nouns, shared family noun."""
    kingdom = lineage["kingdom"]
    family_noun = namer.group_noun(kingdom)
    patterns = list(rng.permutation(PATTERNS))
    genera, taken = [], set()
    for i in range(count):
        noun = namer.genus_common_noun(family_noun, taken)
        taken.add(noun)
        genus_traits = {**traits, "pattern": str(patterns[i % len(patterns)]),
                        "pattern_scale": float(rng.uniform(0.8, 1.3)),
                        "pattern_lighter": bool(rng.integers(0, 2)),
                        "genus_shift": float(rng.uniform(-6.0, 6.0))}
        genera.append(_Genus({**lineage, "genus": namer.latin("genus", kingdom)}, genus_traits, noun))
    return genera


def _spread_order_hues(genera: list[_Genus], rng) -> None:
    """Gives each order a body hue, evenly spaced so that orders differ, then sets genus colours."""
    orders = sorted({g.lineage["order"] for g in genera})
    low, high = _BODY_HUES
    slots = rng.permutation(len(orders))
    hues = {order: low + (high - low) * (slot + rng.uniform(0.2, 0.8)) / len(orders)
            for order, slot in zip(orders, slots)}
    for genus in genera:
        t = genus.traits
        hue = (hues[genus.lineage["order"]] + t["family_shift"] + t["genus_shift"]) % 360.0
        body = np.array(colorsys.hsv_to_rgb(hue / 360.0, t["saturation"], t["value"])) * 255.0
        pattern = body + 0.55 * (255.0 - body) if t["pattern_lighter"] else body * 0.45
        t["body_rgb"] = tuple(float(x) for x in body)
        t["pattern_rgb"] = tuple(float(x) for x in pattern)


def _name_species(genera: list[_Genus], sizes: list[int], rng) -> list[SyntheticSpecies]:
    """Species = genus x epithet, the least used epithets first so that every trait spans genera.

    Small trees draw from fewer epithets (about one per three species) so that each
    epithet still appears on several genera.
    """
    pool = max(max(sizes), math.ceil(sum(sizes) / 3))
    usage = {EPITHET_TRAITS[i].epithet: 0 for i in sorted(rng.permutation(len(EPITHET_TRAITS))[:pool])}
    traits_of = {entry.epithet: entry.trait for entry in EPITHET_TRAITS}
    looks_fields = {field.name for field in dataclasses.fields(Looks)} - {"trait"}
    species = []
    for genus, size in zip(genera, sizes):
        order = sorted(usage, key=lambda epithet: (usage[epithet], rng.uniform()))
        for epithet in sorted(order[:size], key=list(usage).index):
            usage[epithet] += 1
            lineage = genus.lineage
            taxon = Taxon(lineage["kingdom"], lineage["phylum"], lineage["class"], lineage["order"],
                          lineage["family"], lineage["genus"], epithet,
                          common_name(epithet, genus.common_noun))
            looks = Looks(**{k: v for k, v in genus.traits.items() if k in looks_fields},
                          trait=traits_of[epithet])
            species.append(SyntheticSpecies(len(species), taxon, looks, held_out=False))
    return species


def _held_out_count(held_out: float | int, n_species: int) -> int:
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or held_out < 0:
        raise ValueError(f"held_out_species must be a fraction in [0, 1) or a count >= 1, got {held_out!r}")
    if held_out >= 1:
        if held_out != int(held_out):
            raise ValueError(f"held_out_species >= 1 is a count and must be whole, got {held_out}")
        return int(held_out)
    return int(round(held_out * n_species))


def _hold_out(species: list[SyntheticSpecies], count: int, rng) -> list[SyntheticSpecies]:
    """Marks `count` species held out, each keeping half its genus and its epithet in training."""
    genus_size: dict[str, int] = {}
    for s in species:
        genus_size[s.taxon.genus] = genus_size.get(s.taxon.genus, 0) + 1
    train_in_genus = dict(genus_size)
    train_with_epithet: dict[str, int] = {}
    for s in species:
        train_with_epithet[s.epithet] = train_with_epithet.get(s.epithet, 0) + 1
    chosen: set[int] = set()
    for i in rng.permutation(len(species)):
        if len(chosen) == count:
            break
        s = species[int(i)]
        keeps_genus = train_in_genus[s.taxon.genus] - 1 >= math.ceil(genus_size[s.taxon.genus] / 2)
        if keeps_genus and train_with_epithet[s.epithet] - 1 >= 1:
            chosen.add(s.index)
            train_in_genus[s.taxon.genus] -= 1
            train_with_epithet[s.epithet] -= 1
    if len(chosen) < count:
        raise ValueError(
            f"can hold out only {len(chosen)} of the {count} requested species while keeping each "
            f"held-out genus and epithet in training; ask for fewer held-out or more species"
        )
    return [dataclasses.replace(s, held_out=s.index in chosen) for s in species]
