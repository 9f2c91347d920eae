"""`bioclip-jax predict` and `embed-taxa` against pybioclip on the same exported (random) model."""

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax import hub, taxa_embeddings
from bioclip_jax.cli import common, embed_taxa, predict
from bioclip_jax.taxonomy.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.taxonomy import RANKS, Taxon, class_name
from hub_helpers import add_model_folder, add_repo, offline_env


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
def pybioclip():
    """pybioclip's predict module: only the tests that compare with it skip where it is not installed."""
    return pytest.importorskip("bioclip.predict")


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
    return {"root": root, "source": f"local-dir:{root / 'model'}", "images": images}


@pytest.fixture(scope="module")
def reference(setup, pybioclip):
    """pybioclip's classifier of LABELS on the exported model."""
    return pybioclip.CustomLabelsClassifier(LABELS, model_str=setup["source"])


def _run(capsys, argv):
    code = predict.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_templates_are_pybioclips(pybioclip):
    assert [t.replace("{}", "X") for t in OPENAI_IMAGENET_TEMPLATES] == \
        [t("X") for t in pybioclip.OPENA_AI_IMAGENET_TEMPLATE]


def test_custom_labels_match_pybioclip(setup, reference, capsys):
    expected = reference.predict(setup["images"], k=len(LABELS), batch_size=2)
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


def test_embed_taxa_is_pybioclips_embedding_of_taxon_com(setup, reference, capsys):
    out_dir = setup["root"] / "tol"
    code = embed_taxa.main(["--taxa", str(setup["root"] / "catalog.csv"), "--output", str(out_dir),
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
    expected = reference._get_txt_embeddings(texts).numpy()  # pybioclip's own label embedding
    np.testing.assert_allclose(matrix, expected, atol=2e-5)


@pytest.fixture(scope="module")
def local_tree_of_life(pybioclip):
    """pybioclip's tree-of-life classifier, reading an embed-taxa folder instead of the Hugging Face files."""
    torch = pytest.importorskip("torch")

    class LocalTreeOfLife(pybioclip.TreeOfLifeClassifier):
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

    return LocalTreeOfLife


@pytest.fixture(scope="module")
def tol_folder(setup):
    """The embed-taxa folder of CATALOG (made by the embed-taxa test, or here when it runs alone)."""
    out_dir = setup["root"] / "tol"
    if not (out_dir / "txt_emb_species.npy").exists():
        assert embed_taxa.main(["--taxa", str(setup["root"] / "catalog.csv"), "--output", str(out_dir),
                                "--pretrained", setup["source"], "--batch-size", "160", "--no-progress"]) == 0
    return out_dir


def _same_records(ours: list[dict], theirs: list[dict], tolerance: float) -> None:
    """The same rows, columns in the same order, the same names, scores within `tolerance`."""
    assert len(ours) == len(theirs)
    for mine, expected in zip(ours, theirs):
        assert list(mine) == list(expected)  # same columns in the same order
        assert {k: str(v) for k, v in mine.items() if k != "score"} == \
            {k: str(v) for k, v in expected.items() if k != "score"}
        assert float(mine["score"]) == pytest.approx(float(expected["score"]), abs=tolerance)


def _lineage(row: dict, rank: str) -> tuple:
    return tuple(row[r] for r in RANKS[:RANKS.index(rank) + 1] if r != "species") + \
        ((row["species_epithet"],) if rank == "species" else ())


def test_tree_of_life_matches_pybioclip_at_every_rank(setup, reference, local_tree_of_life, pybioclip, tol_folder,
                                                      capsys):
    """The CLI's rows and the Python API's records are pybioclip's TreeOfLifeClassifier.predict records at every
    rank; the open-set answer's score is pybioclip's summed probability of the answered taxon, which reaches
    the confidence while its best child at the next rank does not."""
    theirs = local_tree_of_life(tol_folder, reference, model_str=setup["source"])
    ours = bioclip_jax.TreeOfLifeClassifier(setup["source"], taxa_embeddings=str(tol_folder), batch_size=2,
                                            progress=False, decoders="threads")
    expected = {}
    for rank in RANKS:
        expected[rank] = theirs.predict(setup["images"], pybioclip.Rank[rank.upper()], k=5)  # every taxon: 5 species
        _same_records(ours.predict(setup["images"], rank, k=5), expected[rank], 1e-5)
        code, out, _ = _run(capsys, [*setup["images"], "--pretrained", setup["source"], "--taxa-embeddings",
                                     str(tol_folder), "--rank", rank, "--k", "5", "--workers", "1", "--no-progress"])
        assert code == 0
        _same_records(list(csv.DictReader(io.StringIO(out))), expected[rank], 1e-4)
    answered = set()
    for confidence in (0.95, 0.6, 0.3, 0.1):
        for answer in ours.predict(setup["images"], rank="auto", confidence=confidence):
            rows = {rank: [r for r in expected[rank] if r["file_name"] == answer["file_name"]] for rank in RANKS}
            depth = RANKS.index(answer["rank"]) + 1 if answer["rank"] else 0
            if depth:
                (theirs_sum,) = [r["score"] for r in rows[answer["rank"]]
                                 if _lineage(r, answer["rank"]) == _lineage(answer, answer["rank"])]
                assert answer["score"] == pytest.approx(theirs_sum, abs=1e-5) and theirs_sum >= confidence
            else:
                assert answer["score"] == pytest.approx(rows["kingdom"][0]["score"], abs=1e-5)
            if depth < len(RANKS):
                below = RANKS[depth]
                children = [r["score"] for r in rows[below]
                            if depth == 0 or _lineage(r, answer["rank"]) == _lineage(answer, answer["rank"])]
                assert max(children) < confidence
            answered.add(answer["rank"])
    assert len(answered) >= 3  # the answers lie at several depths


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


# ---- pybioclip's defaults: BioCLIP 2 and its tree-of-life embeddings, from the Hugging Face cache ----


@pytest.fixture(scope="module")
def hub_home(setup, tmp_path_factory):
    """A Hugging Face cache holding 'imageomics/bioclip-2' (a small random model taking 224 x 224
    images, as pybioclip's squash needs) and the species embeddings of 'imageomics/TreeOfLife-200M'
    made from CATALOG by embed-taxa."""
    from bioclip_jax.models.clip import build_model
    from bioclip_jax.models.config import from_open_clip, get_model_config, to_open_clip

    hf_home = tmp_path_factory.mktemp("hf_home")
    cfg = to_open_clip(get_model_config("ViT-Tiny-8"))
    cfg["vision_cfg"].update(image_size=224, patch_size=32)
    folder = setup["root"] / "model224"
    bioclip_jax.export_open_clip(build_model(from_open_clip(cfg), seed=7), str(folder))
    tol = setup["root"] / "tol_hub"
    assert embed_taxa.main(["--taxa", str(setup["root"] / "catalog.csv"), "--output", str(tol),
                            "--pretrained", f"local-dir:{folder}", "--batch-size", "160", "--no-progress"]) == 0
    add_model_folder(hf_home, "imageomics/bioclip-2", folder)
    add_repo(hf_home, "imageomics/TreeOfLife-200M",
             {f"embeddings/{name}": tol / name for name in ("txt_emb_species.npy", "txt_emb_species.json")},
             repo_type="dataset")
    return hf_home


def _pybioclip(env, *argv) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "bioclip", "predict", *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return list(csv.DictReader(io.StringIO(done.stdout)))


@pytest.mark.usefixtures("pybioclip")
def test_default_predict_is_pybioclips(setup, hub_home, monkeypatch, capsys):
    """No model flag: `bioclip-jax predict IMAGES --rank species` == `bioclip predict IMAGES --rank species`."""
    env = offline_env(monkeypatch, hub_home)
    expected = _pybioclip(env, *setup["images"], "--rank", "species")
    code, out, err = _run(capsys, [*setup["images"], "--rank", "species", "--no-progress"])
    assert code == 0, err
    got = list(csv.DictReader(io.StringIO(out)))
    assert len(got) == len(expected) == 3 * 5
    for ours, theirs in zip(got, expected):
        assert list(ours) == list(theirs)
        assert {k: v for k, v in ours.items() if k != "score"} == {k: v for k, v in theirs.items() if k != "score"}
        assert float(ours["score"]) == pytest.approx(float(theirs["score"]), abs=1e-5)
    scores = [float(r["score"]) for r in expected]
    assert max(scores) - min(scores) > 0.05  # open_clip's centre crop instead would be off by ~0.02


@pytest.mark.usefixtures("pybioclip")
def test_default_api_is_pybioclips_at_every_rank(setup, hub_home, monkeypatch):
    """No model argument: our TreeOfLifeClassifier() == pybioclip's TreeOfLifeClassifier() (BioCLIP 2, its
    tree of life, its squashed preprocessing) at every rank, to 1e-5."""
    from bioclip.predict import Rank, TreeOfLifeClassifier

    offline_env(monkeypatch, hub_home)
    theirs = TreeOfLifeClassifier()
    ours = bioclip_jax.TreeOfLifeClassifier(progress=False, decoders="threads")
    for rank in RANKS:
        _same_records(ours.predict(setup["images"], rank, k=5),
                      theirs.predict(setup["images"], Rank[rank.upper()], k=5), 1e-5)


@pytest.mark.usefixtures("pybioclip")
def test_default_model_custom_labels_and_bins(setup, hub_home, monkeypatch, capsys, tmp_path):
    env = offline_env(monkeypatch, hub_home)
    bins = tmp_path / "bins.csv"
    bins.write_text("cls,bin\ncommon raven,bird\nhouse sparrow,bird\ndog rose,plant\nCorvus frugilegus,bird\n")
    for flags in (["--cls", ",".join(LABELS)], ["--bins", str(bins)]):
        expected = _pybioclip(env, *setup["images"], *flags)
        code, out, err = _run(capsys, [*setup["images"], *flags, "--no-progress"])
        assert code == 0, err
        got = list(csv.DictReader(io.StringIO(out)))
        assert [(r["file_name"], r["classification"]) for r in got] == \
            [(r["file_name"], r["classification"]) for r in expected]
        for ours, theirs in zip(got, expected):
            assert float(ours["score"]) == pytest.approx(float(theirs["score"]), abs=1e-5)


def test_squashed_preprocessing_only_for_the_tree_of_life_models(setup, hub_home, monkeypatch):
    offline_env(monkeypatch, hub_home)

    def loaded(**kwargs):
        args = {"pretrained": None, "model": None, **kwargs}
        source = common.model_source(args["pretrained"], args["model"], default=hub.DEFAULT_MODEL)
        return bioclip_jax.pretrained.pybioclip_preprocessing(bioclip_jax.create_model(*source))

    assert loaded().preprocess.resize_mode == "squash"
    assert loaded(model="hf-hub:imageomics/bioclip-2").preprocess.resize_mode == "squash"
    assert loaded(pretrained=setup["source"]).preprocess.resize_mode == "shortest"


def test_missing_default_model_offline_is_one_sentence(setup, tmp_path, monkeypatch, capsys):
    offline_env(monkeypatch, tmp_path / "empty_home")
    code, _, err = _run(capsys, [setup["images"][0], "--no-progress"])
    assert code == 2
    assert "imageomics/bioclip-2" in err and str(tmp_path / "empty_home" / "hub") in err
    assert len(err.strip().splitlines()) == 1


# ---- rough edges ----


def test_custom_taxa_are_embedded_once_and_cached(setup, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("BIOCLIP_JAX_CACHE", str(tmp_path / "cache"))
    argv = [setup["images"][0], "--pretrained", setup["source"], "--taxa", str(setup["root"] / "catalog.csv"),
            "--no-progress"]
    code, first, err = _run(capsys, argv)
    assert code == 0 and "embedding the taxa" in err and str(tmp_path / "cache") in err
    calls = []
    monkeypatch.setattr(taxa_embeddings, "write_taxa_embeddings", lambda *a, **k: calls.append(a))
    code, second, err = _run(capsys, argv)
    assert code == 0 and first == second and not calls and "embedding" not in err
    code, _, err = _run(capsys, argv + ["--text-type", "sci"])  # another text type: another entry
    assert calls


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    from bioclip_jax.transforms import open_rgb

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)  # mode I;16
    assert (np.asarray(Image.open(path).convert("RGB")) == 255).mean() > 0.9  # what PIL alone does
    rgb = np.asarray(open_rgb(path))
    assert rgb.shape == (64, 64, 3)
    assert (rgb == 255).mean() < 0.01
    np.testing.assert_allclose(rgb[..., 0], np.round(ramp / 257.0), atol=1)


def test_label_and_path_mistakes(setup, capsys, tmp_path, monkeypatch):
    base = [setup["images"][0], "--pretrained", setup["source"], "--no-progress", "--format", "json"]
    code, out, err = _run(capsys, base + ["--cls", "crow,raven,crow"])
    assert code == 0 and "'crow' (2 times)" in err
    assert [r["classification"] for r in json.loads(out)] in (["crow", "raven"], ["raven", "crow"])
    code, _, err = _run(capsys, base + ["--cls", str(tmp_path / "labels.txt")])
    assert code == 2 and "no such label file" in err and "labels.txt" in err
    code, _, err = _run(capsys, base + ["--cls", ""])
    assert code == 2 and "--cls is empty" in err and "tree of life" in err
    offline_env(monkeypatch, tmp_path / "empty_hf_home")  # no model flag: the default model is not in the cache
    code, _, err = _run(capsys, [setup["images"][0], "--no-progress", "--cls", ""])
    assert code == 2 and "--cls is empty" in err and "Hugging Face" not in err
    code, out, err = _run(capsys, [setup["images"][0], str(tmp_path / "nope.jpg"), *base[1:], "--cls", "a,b"])
    assert code == 1  # the good image is still predicted, the run reports the missing one
    assert {r["file_name"] for r in json.loads(out)} == {setup["images"][0]}
    assert "nope.jpg" in err


def test_readme_classify_with_the_model_you_just_trained(tmp_path, monkeypatch, capsys):
    """The README's predict example, on a workdir laid out as training leaves it and its synthetic tree."""
    import re
    import shlex
    from pathlib import Path

    from bioclip_jax.synthetic.dataset import make_synthetic
    from workdir_helpers import trained_workdir

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    (command,) = [" ".join(block.replace("\\\n", " ").split()) for block in blocks
                  if "predict" in block and "--pretrained runs/tiny" in block]
    argv = shlex.split(command)
    assert argv[:2] == ["bioclip-jax", "predict"]
    trained_workdir(tmp_path / "runs" / "tiny")
    make_synthetic(str(tmp_path / "runs" / "tiny" / "synthetic"), species=12, images_per_species=2,
                   held_out_species=2, seed=0, image_size=64)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOCLIP_JAX_CACHE", str(tmp_path / "cache"))
    code, out, _ = _run(capsys, [*argv[2:], "--no-progress"])
    assert code == 0
    rows = out.strip().splitlines()[1:]  # a table: a header, then k rows per image
    assert len(rows) == 3 * 4 and all("runs/tiny/synthetic/held_out/images/" in row for row in rows)
