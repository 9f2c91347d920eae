"""Token-for-token parity of bioclip_jax.tokenizer with open_clip's SimpleTokenizer."""

import gzip
import html
import pickle
import random
from pathlib import Path

import ftfy
import numpy as np
import open_clip
import pytest

from bioclip_jax import tokenizer as tokenizer_module
from bioclip_jax.tokenizer import Tokenizer, clean_text, get_tokenizer

# (kingdom, phylum, class, order, family, genus, epithet, common name)
TAXA = [
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax", "Common raven"),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Fringillidae", "Pyrrhula", "pyrrhula", "Eurasian bullfinch"),
    ("Animalia", "Chordata", "Aves", "Passeriformes", "Troglodytidae", "Thryomanes", "bewickii", "Bewick's wren"),
    ("Animalia", "Chordata", "Aves", "Suliformes", "Sulidae", "Sula", "nebouxii", "Blue-footed booby"),
    ("Animalia", "Chordata", "Aves", "Accipitriformes", "Accipitridae", "Accipiter", "nisus", "Épervier d'Europe"),
    ("Animalia", "Chordata", "Mammalia", "Carnivora", "Felidae", "Panthera", "leo", "Lion"),
    ("Animalia", "Chordata", "Mammalia", "Primates", "Hominidae", "Homo", "sapiens", "Human"),
    ("Animalia", "Chordata", "Actinopterygii", "Perciformes", "Pomacentridae", "Amphiprion", "ocellaris", "Clown anemonefish"),
    ("Animalia", "Chordata", "Amphibia", "Anura", "Dendrobatidae", "Dendrobates", "tinctorius", "Dyeing poison-dart frog"),
    ("Animalia", "Chordata", "Reptilia", "Squamata", "Viperidae", "Crotalus", "atrox", "Western diamond-backed rattlesnake"),
    ("Animalia", "Arthropoda", "Insecta", "Lepidoptera", "Nymphalidae", "Danaus", "plexippus", "Monarch butterfly"),
    ("Animalia", "Arthropoda", "Insecta", "Coleoptera", "Coccinellidae", "Coccinella", "septempunctata", "Seven-spot ladybird"),
    ("Animalia", "Mollusca", "Cephalopoda", "Octopoda", "Octopodidae", "Octopus", "vulgaris", "Common octopus"),
    ("Animalia", "Cnidaria", "Anthozoa", "Scleractinia", "Acroporidae", "Acropora", "millepora", ""),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Lamiales", "Lamiaceae", "Mentha", "× piperita", "Peppermint"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Rosales", "Rosaceae", "Rosa", "canina", "Dog rose"),
    ("Plantae", "Tracheophyta", "Pinopsida", "Pinales", "Pinaceae", "Pinus", "sylvestris", "Scots pine"),
    ("Plantae", "Tracheophyta", "Liliopsida", "Asparagales", "Orchidaceae", "Ophrys", "apifera", "Bee orchid"),
    ("Plantae", "Bryophyta", "Bryopsida", "Hypnales", "Hypnaceae", "Hypnum", "cupressiforme", "Cypress-leaved plait-moss"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Fagales", "Fagaceae", "Quercus", "robur", "English oak"),
    ("Plantae", "Tracheophyta", "Magnoliopsida", "Sapindales", "Sapindaceae", "Acer", "saccharum", "Sugar maple"),
    ("Fungi", "Basidiomycota", "Agaricomycetes", "Agaricales", "Amanitaceae", "Amanita", "muscaria", "Fly agaric"),
    ("Fungi", "Ascomycota", "Pezizomycetes", "Pezizales", "Morchellaceae", "Morchella", "esculenta", "Yellow morel"),
    ("Fungi", "Basidiomycota", "Agaricomycetes", "Boletales", "Boletaceae", "Boletus", "edulis", "Penny bun"),
    ("Bacteria", "Cyanobacteria", "Cyanophyceae", "Nostocales", "Nostocaceae", "Nostoc", "commune", "Star jelly"),
    ("Chromista", "Ochrophyta", "Bacillariophyceae", "Naviculales", "Naviculaceae", "Navicula", "tripunctata", ""),
    ("Protozoa", "Amoebozoa", "Myxomycetes", "Physarales", "Physaraceae", "Physarum", "polycephalum", "Many-headed slime"),
    ("Archaea", "Euryarchaeota", "Halobacteria", "Halobacteriales", "Halobacteriaceae", "Halobacterium", "salinarum", ""),
]
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

COMMON_NAMES_ELSEWHERE = [
    "Grünspecht", "Cigüeña blanca", "Ñandú", "Sæl", "Øresvale", "Żuraw", "Čáp bílý", "Ålfågel",
    "Rødstrupe", "Weißstorch", "Façade", "Hirondelle rustique", "Gobe-mouches gris",
    "カラス", "渡鸦", "큰까마귀", "Ворон", "Κόρακας", "غراب", "कौआ", "Quạ thường", "Kuzgun",
]

HANDWRITTEN = [
    "Animalia Chordata Aves Passeriformes Corvidae Corvus corax",
    "a photo of Corvus corax.",
    "a photo of kingdom Animalia phylum Chordata class Aves order Passeriformes family Corvidae genus Corvus species corax.",
    "a photo of Corvus corax with common name Common raven.",
    "Pyrrhula pyrrhula (Linnaeus, 1758)", "Corvus corax Linnaeus, 1758", "Quercus robur L.",
    "Amanita muscaria (L.) Lam.", "Bewick's wren", "Épervier d'Europe", "Blue-footed booby",
    "Mentha × piperita", "Mentha x piperita", "x", "×", "X", "Quercus ×rosacea", "sp.", "sp. nov.",
    "cf. Corvus", "aff. corax", "Corvus sp. [unidentified]", "Corvus_corax", "corvus-corax", "CORVUS CORAX",
    "&amp;", "&#39;", "&lt;b&gt;", "&amp;amp;lt;", "&amp;amp;amp;lt;b&amp;amp;amp;gt;", "&nbsp;", "AT&T", "Q&A",
    "<b>&amp;amp;lt;</b>", "<i>Corvus</i> &amp;amp; Pica",  # with tags present ftfy leaves entities alone
    "&quot;raven&quot;", "&eacute;pervier", "&#x263A;", "&unknownentity;", "&", "&&&",
    "🐦", "🦅🦉", "a photo of a 🐸.", "👨\u200d👩\u200d👧", "🇫🇷 bird", "鸟类", "ワタリガラス", "까마귀",
    "tab\tseparated\tvalues", "new\nline", "windows\r\nline", "many     spaces", "  leading and trailing  ",
    "\t\n  \r", "", " ", "\u3000ideographic\u3000space", "non\xa0breaking", "zero\u200bwidth", "a\x85b",
    "\x00null\x07bell", "\x1b[31mred\x1b[0m", "\x1c\x1dx\x1e\x1fy",
    "CafÃ©", "â€œquotedâ€\x9d", "“Corvus”", "‘single’", "ＡＢＣ ｆｕｌｌｗｉｄｔｈ", "ﬁsh ﬂower",
    "e\u0301pervier", "İstanbul", "'ſ", "ß", "ǅ",
    "1758", "3.14159", "1,000,000", "2nd instar", "-12.5°C", "50%", "#hashtag", "@user", "a+b=c",
    "!!!???", "...", "--", "(", ")", "[]", "{}", "<>", "\"", "'", "`", "~", "\\", "/", "|", "^", "_",
    "'s", "don't", "I'LL", "WE'RE", "they've", "I'm", "he'd", "it's", "o'clock",
    "<start_of_text>", "<END_OF_TEXT>", "<start_of_text> hi <end_of_text>", "<|endoftext|>",
    "https://eol.org/pages/1049?x=1&amp;y=2", "user@example.org",
    "\ud800lone surrogate", "a\udcffb",
]

TEMPLATES = [
    "{}", "a photo of {}.", "a bad photo of a {}.", "itap of the {}.", "a close-up photo of a {}.",
    "a drawing of the {}.", "a photo of the small {}.", "art of the {}.", "a jpeg corrupted photo of a {}.",
]


def captions_of(taxon):
    """All TreeOfLife caption forms of one taxon (see DESIGN.md, section 1)."""
    *higher, genus, epithet, common = taxon
    scientific = f"{genus} {epithet}"
    taxonomic = " ".join([*higher, scientific])
    tagged = " ".join(f"{rank} {name}" for rank, name in zip(RANKS, [*higher, genus, epithet]))
    common = common or scientific
    return [
        scientific, taxonomic, common, f"a photo of {scientific}.", f"a photo of {common}.",
        f"a photo of {taxonomic}.", f"a photo of {tagged}.",
        f"a photo of {scientific} with common name {common}.",
        f"a photo of {taxonomic} with common name {common}.",
        f"a photo of {tagged} with common name {common}.",
    ]


NOISE = ["", " ", "  ", "\t", "\n", ".", ",", "!", "?", "'", "-", "&amp;", "&#39;", "(1758)", "×", "😀", "é", "鸟", "\u200b"]


def generated_strings(count=600, seed=0):
    """Random but reproducible mixes of names, templates, case changes and noise."""
    rng = random.Random(seed)
    vocabulary = [w for taxon in TAXA for part in taxon for w in part.split()] + COMMON_NAMES_ELSEWHERE
    out = []
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            text = rng.choice(captions_of(rng.choice(TAXA)))
        elif kind == 1:
            text = rng.choice(TEMPLATES).format(rng.choice(vocabulary + [t[7] for t in TAXA if t[7]]))
        elif kind == 2:
            words = [rng.choice(vocabulary) for _ in range(rng.randint(1, 12))]
            text = "".join(w + rng.choice(NOISE + [" "] * 8) for w in words)
        else:
            pool = "abcXYZ019 .,'-&;#<>\t\néÅßø×😀🦉鸟カ\xa0\u200b\x07"
            text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        text = rng.choice([str, str, str.upper, str.title, str.swapcase])(text)
        out.append(text)
    return out


ALL_STRINGS = HANDWRITTEN + [c for taxon in TAXA for c in captions_of(taxon)] + COMMON_NAMES_ELSEWHERE + generated_strings()


@pytest.fixture(scope="module")
def ours():
    return Tokenizer()


@pytest.fixture(scope="module")
def reference():
    return open_clip.get_tokenizer("ViT-B-16")


def assert_same_rows(strings, ours_ids, reference_ids):
    ours_ids, reference_ids = np.asarray(ours_ids), np.asarray(reference_ids)
    assert ours_ids.shape == reference_ids.shape
    differing = np.flatnonzero((ours_ids != reference_ids).any(axis=1))
    assert differing.size == 0, "token mismatch for " + "; ".join(
        f"{strings[i]!r}: ours {ours_ids[i][ours_ids[i] > 0].tolist()} vs open_clip {reference_ids[i][reference_ids[i] > 0].tolist()}"
        for i in differing[:5]
    )


def test_vocabulary_file_is_open_clips():
    shipped = Path(tokenizer_module.VOCAB_PATH).read_bytes()
    reference_path = Path(open_clip.__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
    assert shipped == reference_path.read_bytes()
    assert (Path(tokenizer_module.__file__).parent / "LICENSE_CLIP_VOCAB.txt").read_text().count("OpenAI") >= 2


def test_special_ids_and_vocab_size_match(ours, reference):
    assert ours.vocab_size == reference.vocab_size == 49408
    assert (ours.sot_token_id, ours.eot_token_id) == (reference.sot_token_id, reference.eot_token_id) == (49406, 49407)


def test_hundreds_of_strings_match_open_clip(ours, reference):
    assert len(ALL_STRINGS) > 800
    assert_same_rows(ALL_STRINGS, ours(ALL_STRINGS), reference(ALL_STRINGS).numpy())


def test_module_level_tokenize_matches(ours):
    strings = HANDWRITTEN[:40]
    assert_same_rows(strings, ours(strings, context_length=77), open_clip.tokenizer.tokenize(strings).numpy())


@pytest.mark.parametrize("context_length", [2, 5, 16, 77])
def test_truncation_keeps_end_of_text_last(ours, reference, context_length):
    long_strings = [
        " ".join(captions_of(taxon)) for taxon in TAXA[:6]
    ] + ["Corvus corax " * 60, "😀" * 100, "&amp;" * 80, "a." * 100, "x " * (context_length - 2), "x " * (context_length - 1)]
    ids = ours(long_strings, context_length=context_length)
    assert_same_rows(long_strings, ids, reference(long_strings, context_length=context_length).numpy())
    assert ids.shape == (len(long_strings), context_length)
    assert (ids[:, 0] == ours.sot_token_id).all()
    assert (ids[:, -1] == ours.eot_token_id).all()
    assert ids[-2, -2] != ours.eot_token_id  # exactly fits: no truncation, one end token only


def test_encode_and_decode_match_open_clip(ours, reference):
    for text in HANDWRITTEN + generated_strings(count=100, seed=1):
        ids = ours.encode(text)
        assert ids == reference.encode(text), text
        assert ours.decode(ids) == reference.decode(ids), text


@pytest.mark.parametrize(
    ("text", "decoded"),
    [
        ("corvus corax", "corvus corax "),
        ("animalia chordata aves passeriformes corvidae corvus corax", "animalia chordata aves passeriformes corvidae corvus corax "),
        ("a photo of corvus corax.", "a photo of corvus corax . "),
        ("bewick's wren", "bewick 's wren "),
        ("mentha × piperita", "mentha × piperita "),
        ("épervier d'europe", "épervier d ' europe "),
    ],
)
def test_decode_inverts_encode_for_simple_lowercase_text(ours, text, decoded):
    # CLIP's decoder marks every word end with a space, so punctuation comes back spaced out.
    assert ours.decode(ours.encode(text)) == decoded


def test_plain_ascii_shortcut_equals_full_cleaning():
    rng = random.Random(2)
    printable = [chr(c) for c in range(0x20, 0x7F)]
    samples = ["".join(rng.choice(printable) for _ in range(rng.randint(0, 30))) for _ in range(2000)] + HANDWRITTEN
    for text in samples:
        full = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split()).lower()
        assert clean_text(text) == full, text


def test_output_contract(ours):
    single = ours("a photo of Corvus corax.")
    assert single.dtype == np.int32 and single.shape == (1, 77)
    row = single[0]
    length = int(np.flatnonzero(row == ours.eot_token_id)[0]) + 1
    assert row[0] == ours.sot_token_id and (row[length:] == 0).all() and (row[1 : length - 1] > 0).all()
    batch = ours(("Corvus corax", "", "Quercus robur"), context_length=12)
    assert batch.dtype == np.int32 and batch.shape == (3, 12)
    assert batch[1].tolist() == [ours.sot_token_id, ours.eot_token_id] + [0] * 10
    assert ours([]).shape == (0, 77)
    assert ours(np.array(["Corvus corax"])).tolist() == ours(["Corvus corax"]).tolist()
    assert Tokenizer(context_length=20)("Corvus corax").shape == (1, 20)


def test_get_tokenizer_accepts_any_model_name():
    default = get_tokenizer()
    assert get_tokenizer("ViT-L-14-quickgelu") is default
    assert get_tokenizer("hf-hub:imageomics/bioclip", context_length=32)("Corvus corax").shape == (1, 32)
    assert default.context_length == 77


def test_pickled_tokenizer_gives_same_tokens(ours):
    strings = ALL_STRINGS[:50]
    restored = pickle.loads(pickle.dumps(ours))
    assert restored.context_length == ours.context_length
    np.testing.assert_array_equal(restored(strings), ours(strings))


def test_bad_input_gives_clear_errors(ours):
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        ours(["fine", 3])
    with pytest.raises(TypeError, match="sequence of str"):
        ours(42)
    with pytest.raises(TypeError, match="expects a str"):
        ours.encode(b"bytes")
    with pytest.raises(ValueError, match="context_length"):
        ours("x", context_length=1)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer(context_length=0)
    with pytest.raises(ValueError, match="position 1"):
        ours.decode([320, 49408])
    with pytest.raises(TypeError, match="model_name"):
        get_tokenizer(None)


def test_malformed_vocabulary_file_is_reported(tmp_path):
    not_gzip = tmp_path / "vocab.txt.gz"
    not_gzip.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match="cannot read the BPE merge file"):
        Tokenizer(vocab_path=not_gzip)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(ValueError, match="malformed"):
        Tokenizer(vocab_path=short)
