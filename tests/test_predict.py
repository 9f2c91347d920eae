"""`bioclip-jax predict` and `embed-taxa` against pybioclip on the same exported (random) model."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.cli import embed_taxa, predict
from bioclip_jax.evaluate.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.taxonomy import Taxon, class_name

torch = pytest.importorskip("torch")
pybioclip = pytest.importorskip("bioclip.predict")

CATALOG = """split,treeoflife_id,kingdom,phylum,class,order,family,genus,species,common
train,a1,Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,corax,
train,a2,Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,corax,common raven
train,a3,Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,frugilegus,rook
train,a4,Animalia,Chordata,Aves,Passeriformes,Passeridae,Passer,domesticus,house sparrow
train,a5,Metazoa,Chordata,Aves,Passeriformes,Corvidae,Pica,pica,Eurasian magpie
train,a6,Plantae,Tracheophyta,Magnoliopsida,Rosales,Rosaceae,Rosa,canina,dog rose
train,a7,Animalia,Chordata,Aves,Passeriformes,Corvidae,,,
"""
LABELS = ["common raven", "house sparrow", "dog rose", "Corvus frugilegus"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=3)
    bioclip_jax.export_open_clip(model, str(root / "model"))
    rng = np.random.default_rng(1)
    images = []
    for i, (w, h, mode) in enumerate([(96, 80, "RGB"), (64, 120, "L"), (70, 70, "RGBA")]):
        path = root / "images" / f"{i}.{'jpg' if mode != 'RGBA' else 'png'}"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode).save(path)
        images.append(str(path))
    (root / "catalog.csv").write_text(CATALOG)
    source = f"local-dir:{root / 'model'}"
    reference = pybioclip.CustomLabelsClassifier(LABELS, model_str=source)
    return {"root": root, "source": source, "images": images, "reference": reference}


def _run(capsys, argv):
    code = predict.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_templates_are_pybioclips():
    assert [t.replace("{}", "X") for t in OPENAI_IMAGENET_TEMPLATES] == \
        [t("X") for t in pybioclip.OPENA_AI_IMAGENET_TEMPLATE]


def test_custom_labels_match_pybioclip(setup, capsys):
    expected = setup["reference"].predict(setup["images"], k=len(LABELS), batch_size=2)
    code, out, _ = _run(capsys, [*setup["images"], "--pretrained", setup["source"], "--cls", ",".join(LABELS),
                                 "--k", str(len(LABELS)), "--format", "json", "--batch-size", "2", "--no-progress"])
    assert code == 0
    got = {(r["file_name"], r["classification"]): r["score"] for r in json.loads(out)}
    want = {(r["file_name"], r["classification"]): r["score"] for r in expected}
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    spread = max(want.values()) - min(want.values())
    assert spread > 1e-3  # the comparison is not between near-equal numbers only


def test_embed_taxa_is_pybioclips_embedding_of_taxon_com(setup, capsys):
    out_dir = setup["root"] / "tol"
    code = embed_taxa.main(["--taxa", str(setup["root"] / "catalog.csv"), "--out", str(out_dir),
                            "--pretrained", setup["source"], "--batch-size", "160", "--no-progress"])
    assert code == 0
    assert "names/s" in capsys.readouterr().out
    matrix = np.load(out_dir / "txt_emb_species.npy")
    names = json.load(open(out_dir / "txt_emb_species.json"))
    assert matrix.shape == (128, 5) and matrix.dtype == np.float32
    raven = ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax"]
    assert names[0] == [raven, "common raven"]  # the later row's common name fills the gap
    assert names[3][0][0] == "Animalia"  # Metazoa normalised
    taxa = [Taxon.from_ranks(**dict(zip(("kingdom", "phylum", "class", "order", "family", "genus", "species"),
                                        ranks)), common=common) for ranks, common in names]
    texts = [class_name(t, "taxon_com") for t in taxa]
    reference = setup["reference"]._get_txt_embeddings(texts).numpy()  # pybioclip's own label embedding
    np.testing.assert_allclose(matrix, reference, atol=2e-5)


class _LocalTreeOfLife(pybioclip.TreeOfLifeClassifier):
    """pybioclip's classifier reading an embed-taxa folder instead of the Hugging Face files."""

    def __init__(self, directory, loaded, **kwargs):
        object.__setattr__(self, "_directory", directory)  # before nn.Module.__init__, so bypass its checks
        object.__setattr__(self, "_loaded", loaded)
        super().__init__(**kwargs)

    def load_pretrained_model(self, model_str=None, pretrained_str=None):
        self.model_str, self.model, self.preprocess = model_str, self._loaded.model, self._loaded.preprocess

    def get_txt_emb(self):
        return torch.from_numpy(np.load(self._directory / "txt_emb_species.npy"))

    def get_txt_names(self):
        return json.load(open(self._directory / "txt_emb_species.json"))


@pytest.mark.parametrize("rank", ["species", "family"])
def test_tree_of_life_matches_pybioclip(setup, capsys, rank):
    out_dir = setup["root"] / "tol"
    if not (out_dir / "txt_emb_species.npy").exists():
        embed_taxa.main(["--taxa", str(setup["root"] / "catalog.csv"), "--out", str(out_dir),
                         "--pretrained", setup["source"], "--batch-size", "160", "--no-progress"])
    classifier = _LocalTreeOfLife(out_dir, setup["reference"], model_str=setup["source"])
    expected = classifier.predict(setup["images"], pybioclip.Rank[rank.upper()], k=3)
    code, out, _ = _run(capsys, [*setup["images"], "--pretrained", setup["source"], "--taxa-embeddings",
                                 str(out_dir), "--rank", rank, "--k", "3", "--no-progress"])
    assert code == 0
    got = list(csv.DictReader(io.StringIO(out)))
    assert len(got) == len(expected) == 3 * 3
    for ours, theirs in zip(got, expected):
        assert list(ours) == list(theirs)  # same columns in the same order
        assert {k: v for k, v in ours.items() if k != "score"} == \
            {k: str(v) for k, v in theirs.items() if k != "score"}
        assert float(ours["score"]) == pytest.approx(theirs["score"], abs=1e-4)


def test_subset_unreadable_images_and_errors(setup, capsys, tmp_path):
    out_dir = setup["root"] / "tol_subset"
    subset = tmp_path / "subset.csv"
    subset.write_text("genus\nCorvus\n")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    code, out, err = _run(capsys, [setup["images"][0], str(broken), "--pretrained", setup["source"],
                                   "--taxa", str(setup["root"] / "catalog.csv"), "--taxa-embeddings", str(out_dir),
                                   "--subset", str(subset), "--k", "5", "--format", "table", "--no-progress"])
    assert code == 0
    assert (out_dir / "txt_emb_species.json").exists()  # built from --taxa on first use
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["file_name", "kingdom", "phylum"]
    assert len(lines) == 1 + 2 and all(" Corvus " in line for line in lines[1:])  # 2 Corvus species
    assert f"skipped 1 unreadable images:\n  {broken}" in err
    subset.write_text("genus\nCorvus\nNotagenus\n")
    code, _, err = _run(capsys, [setup["images"][0], "--pretrained", setup["source"], "--taxa-embeddings",
                                 str(out_dir), "--subset", str(subset)])
    assert code == 2 and "unknown genus notagenus" in err
    code, _, err = _run(capsys, [setup["images"][0], "--pretrained", setup["source"], "--rank", "genus",
                                 "--cls", "a,b"])
    assert code == 2 and "cannot be combined" in err
    code, _, err = _run(capsys, [setup["images"][0], "--pretrained", setup["source"]])
    assert code == 2 and "--taxa-embeddings" in err
    code, _, err = _run(capsys, [str(broken), "--pretrained", setup["source"], "--cls", "a,b", "--no-progress"])
    assert code == 1
