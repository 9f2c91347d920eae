"""Taxon normalisation and the exact TreeOfLife-10M caption strings."""

import dataclasses
import math

import pytest

from bioclip_jax.taxonomy import (
    CAPTION_FILES,
    NAME_FILES,
    RANDOM_POOL,
    RANKS,
    TEXT_TYPES,
    Taxon,
    caption,
    check_text_type,
    class_name,
    sample_captions,
)

RAVEN = Taxon.from_ranks(
    kingdom="Animalia", phylum="Chordata", cls="Aves", order="Passeriformes",
    family="Corvidae", genus="Corvus", species="corax", common="Common Raven",
)
RAVEN_TAXONOMIC = "Animalia Chordata Aves Passeriformes Corvidae Corvus corax"
RAVEN_TAGGED = (
    "kingdom Animalia phylum Chordata class Aves order Passeriformes "
    "family Corvidae genus Corvus species corax"
)


def test_raven_names():
    assert RAVEN.scientific_name == "Corvus corax"
    assert RAVEN.taxonomic_name == RAVEN_TAXONOMIC
    assert RAVEN.tagged_name == RAVEN_TAGGED
    assert RAVEN.common_or_fallback == "Common Raven"
    assert RAVEN.ranks_tuple() == (
        "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax",
    )


def test_raven_every_caption_exactly():
    expected = {
        "sci": "a photo of Corvus corax.",
        "com": "a photo of Common Raven.",
        "taxon": f"a photo of {RAVEN_TAXONOMIC}.",
        "taxonTag": f"a photo of {RAVEN_TAGGED}.",
        "sci_com": "a photo of Corvus corax with common name Common Raven.",
        "taxon_com": f"a photo of {RAVEN_TAXONOMIC} with common name Common Raven.",
        "taxonTag_com": f"a photo of {RAVEN_TAGGED} with common name Common Raven.",
    }
    assert set(expected) == set(TEXT_TYPES)
    for text_type, text in expected.items():
        assert caption(RAVEN, text_type) == text, text_type


def test_class_names_are_captions_without_wrapper():
    assert class_name(RAVEN, "sci") == "Corvus corax"
    assert class_name(RAVEN, "com") == "Common Raven"
    assert class_name(RAVEN, "taxon") == RAVEN_TAXONOMIC
    assert class_name(RAVEN, "sci_com") == "Corvus corax with common name Common Raven"
    assert class_name(RAVEN, "taxon_com") == f"{RAVEN_TAXONOMIC} with common name Common Raven"
    for text_type in TEXT_TYPES:
        assert caption(RAVEN, text_type) == f"a photo of {class_name(RAVEN, text_type)}."


def test_plant_from_archaeplastida_catalog_row():
    row = {
        "split": "train", "treeoflife_id": "0a1b", "eol_page_id": "1151323",
        "kingdom": "Archaeplastida", "phylum": "Tracheophyta", "class": "Magnoliopsida",
        "order": "Fagales", "family": "Fagaceae", "genus": "Quercus", "species": "alba",
        "common": "white oak",
    }
    oak = Taxon.from_mapping(row)
    assert oak.kingdom == "Plantae"
    assert caption(oak, "taxon_com") == (
        "a photo of Plantae Tracheophyta Magnoliopsida Fagales Fagaceae Quercus alba "
        "with common name white oak."
    )
    assert caption(oak, "sci_com") == "a photo of Quercus alba with common name white oak."


def test_chloroplastida_and_metazoa_are_renamed():
    assert Taxon(kingdom="Chloroplastida", genus="Acer").kingdom == "Plantae"
    monarch = Taxon.from_ranks(
        kingdom="Metazoa", phylum="Arthropoda", **{"class": "Insecta"}, order="Lepidoptera",
        family="Nymphalidae", genus="Danaus", species="plexippus", common="Monarch Butterfly",
    )
    assert monarch.kingdom == "Animalia"
    assert caption(monarch, "taxonTag") == (
        "a photo of kingdom Animalia phylum Arthropoda class Insecta order Lepidoptera "
        "family Nymphalidae genus Danaus species plexippus."
    )


def test_fungus_captions():
    fly_agaric = Taxon.from_mapping({
        "kingdom": "Fungi", "phylum": "Basidiomycota", "class": "Agaricomycetes",
        "order": "Agaricales", "family": "Amanitaceae", "genus": "Amanita",
        "species": "muscaria", "common": "Fly Agaric",
    })
    assert caption(fly_agaric, "sci") == "a photo of Amanita muscaria."
    assert caption(fly_agaric, "com") == "a photo of Fly Agaric."
    assert caption(fly_agaric, "taxon") == (
        "a photo of Fungi Basidiomycota Agaricomycetes Agaricales Amanitaceae Amanita muscaria."
    )


def test_bacterium_with_few_ranks_and_no_common_name():
    nostoc = Taxon.from_mapping({"kingdom": "Bacteria", "phylum": "Cyanobacteria", "genus": "Nostoc",
                                 "species": "", "common": ""})
    assert nostoc.scientific_name == "Nostoc"
    assert nostoc.common_or_fallback == "Nostoc"
    assert caption(nostoc, "taxon") == "a photo of Bacteria Cyanobacteria Nostoc."
    assert caption(nostoc, "taxonTag") == "a photo of kingdom Bacteria phylum Cyanobacteria genus Nostoc."
    assert caption(nostoc, "com") == "a photo of Nostoc."
    assert caption(nostoc, "taxon_com") == "a photo of Bacteria Cyanobacteria Nostoc with common name Nostoc."
    assert caption(nostoc, "taxonTag_com") == (
        "a photo of kingdom Bacteria phylum Cyanobacteria genus Nostoc with common name Nostoc."
    )


def test_missing_class_and_order_are_left_out():
    beetle = Taxon(kingdom="Animalia", phylum="Arthropoda", family="Carabidae",
                   genus="Carabus", species="nemoralis")
    assert beetle.taxonomic_name == "Animalia Arthropoda Carabidae Carabus nemoralis"
    assert beetle.tagged_name == (
        "kingdom Animalia phylum Arthropoda family Carabidae genus Carabus species nemoralis"
    )
    assert "  " not in caption(beetle, "taxon_com")


def test_missing_common_name_falls_back_to_scientific_name():
    raven = dataclasses.replace(RAVEN, common="")
    assert caption(raven, "com") == "a photo of Corvus corax."
    assert caption(raven, "sci_com") == "a photo of Corvus corax with common name Corvus corax."


def test_missing_genus_falls_back_to_lowest_rank():
    corvid = Taxon(kingdom="Animalia", phylum="Chordata", cls="Aves", order="Passeriformes",
                   family="Corvidae")
    assert corvid.scientific_name == "Corvidae"
    assert corvid.common_or_fallback == "Corvidae"
    assert caption(corvid, "taxon") == "a photo of Animalia Chordata Aves Passeriformes Corvidae."


def test_genus_without_epithet():
    crows = Taxon(kingdom="Animalia", genus="Corvus", common="crows")
    assert crows.scientific_name == "Corvus"
    assert caption(crows, "sci_com") == "a photo of Corvus with common name crows."


def test_normalisation_of_case_whitespace_and_empty_cells():
    messy = Taxon.from_mapping({
        "Kingdom": "  animalia ", "phylum": "CHORDATA", "class": "aves", "order": "passeriformes",
        "family": "corvidae\t", "genus": "corvus", "species": " Corax ", "common": "  Common   Raven ",
    })
    assert messy == RAVEN
    assert Taxon.from_mapping({"genus": "Corvus", "species": math.nan, "common": None}) == Taxon(genus="Corvus")
    assert Taxon(genus="Corvus", species="unknown", family="not_classified") == Taxon(genus="Corvus")


def test_binomial_in_epithet_column_is_split():
    assert Taxon(genus="Corvus", species="Corvus corax") == Taxon(genus="Corvus", species="corax")
    moved = Taxon(family="Corvidae", species="Corvus corax")
    assert (moved.genus, moved.species) == ("Corvus", "corax")
    assert Taxon(genus="Corvus", species="corax varius").species == "corax varius"


def test_common_name_keeps_its_case():
    assert Taxon(genus="Quercus", species="alba", common="white oak").common == "white oak"


def test_lineage_compares_taxa_at_a_rank():
    corone = Taxon(kingdom="Animalia", phylum="Chordata", cls="Aves", order="Passeriformes",
                   family="Corvidae", genus="Corvus", species="corone")
    magpie = dataclasses.replace(corone, genus="Pica", species="pica")
    assert RAVEN.lineage("genus") == corone.lineage("genus")
    assert RAVEN.lineage("species") != corone.lineage("species")
    assert RAVEN.lineage("genus") != magpie.lineage("genus")
    assert RAVEN.lineage("family") == magpie.lineage("family")
    assert RAVEN.lineage("kingdom") == ("Animalia",)
    assert RAVEN.lineage("class") == RAVEN.lineage("cls") == ("Animalia", "Chordata", "Aves")
    assert len(RAVEN.lineage("species")) == len(RANKS)
    # A missing rank stays in place instead of shifting the names below it up.
    assert Taxon(kingdom="Animalia", order="X").lineage("order") == ("Animalia", "", "", "X")
    with pytest.raises(ValueError, match="unknown rank 'subspecies'"):
        RAVEN.lineage("subspecies")


def test_taxon_is_frozen_and_hashable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RAVEN.genus = "Pica"
    assert len({RAVEN, Taxon.from_mapping({**dict(zip(RANKS, RAVEN.ranks_tuple())), "common": "Common Raven"})}) == 1


def test_constructor_errors_are_clear():
    with pytest.raises(ValueError, match="either 'class' or 'cls'"):
        Taxon.from_ranks(cls="Aves", **{"class": "Aves"})
    with pytest.raises(ValueError, match="unknown taxon field"):
        Taxon.from_ranks(genus="Corvus", subspecies="x")
    with pytest.raises(TypeError, match="taxon genus must be a string"):
        Taxon(genus=12)


def test_sample_captions_has_every_treeoflife_member():
    texts = sample_captions(RAVEN)
    assert set(texts) == set(NAME_FILES) | set(CAPTION_FILES)
    assert len(texts) == 10
    assert texts["scientific_name.txt"] == "Corvus corax"
    assert texts["taxonomic_name.txt"] == RAVEN_TAXONOMIC
    assert texts["common_name.txt"] == "Common Raven"
    for ext, text_type in CAPTION_FILES.items():
        assert ext == f"{text_type}.txt"
        assert texts[ext] == caption(RAVEN, text_type)


def test_sample_captions_common_name_member_stays_raw():
    texts = sample_captions(Taxon(kingdom="Bacteria", genus="Nostoc"))
    assert texts["common_name.txt"] == ""
    assert texts["com.txt"] == "a photo of Nostoc."


def test_empty_taxon_and_unknown_text_type_are_rejected():
    with pytest.raises(ValueError, match="no ranks"):
        caption(Taxon(common="ghost"), "com")
    with pytest.raises(ValueError, match="no ranks"):
        sample_captions(Taxon())
    with pytest.raises(ValueError, match="unknown text type 'scientific'.*taxonTag_com"):
        caption(RAVEN, "scientific")
    assert check_text_type("taxonTag") == "taxonTag"


def test_random_pool_is_the_reference_choice_set():
    assert RANDOM_POOL == ("sci", "com", "taxon", "sci_com", "taxon_com")
    assert set(RANDOM_POOL) < set(TEXT_TYPES)
