"""`python -m bioclip_jax.evaluate` end to end on tiny image folders, a TFDS mock and a training workdir."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.cli import eval as cli
from bioclip_jax.evaluate import results
from bioclip_jax.models.params import flat_params
from bioclip_jax.pretrained import model_metadata

COLOURS = {"Corvus corax": (15, 15, 20), "Corvus albus": (235, 235, 230), "Passer domesticus": (200, 60, 30),
           "Rosa canina": (40, 170, 60)}
TAXA = """kingdom,phylum,class,order,family,genus,species,common
Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,corax,common raven
Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,albus,pied crow
Animalia,Chordata,Aves,Passeriformes,Passeridae,Passer,domesticus,house sparrow
Plantae,Tracheophyta,Magnoliopsida,Rosales,Rosaceae,Rosa,canina,dog rose
"""
TINY = ["--pretrained=random", "--model=ViT-Tiny-8", "--no_progress", "--text_batch_size=160", "--batch_size=16"]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """Four clearly separable classes: flat colours with a little noise, 7 images each."""
    root = tmp_path_factory.mktemp("eval") / "held_out"
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        os.makedirs(root / "images" / name)
        for i in range(7):
            pixels = np.clip(np.asarray(colour) + rng.normal(0, 12, (72, 80, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{i}.jpg")
    (root / "taxa.csv").write_text(TAXA)
    return root / "images"


def _records(path):
    return {(r["dataset"], r["metric"]): r for r in json.load(open(path))["records"]}


def test_folder_zero_and_few_shot_with_per_rank(colour_folder, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    code = cli.main([*TINY, f"--data=folder:{colour_folder}", "--tasks=zero_shot,few_shot,linear_probe",
                     "--text_type=taxon_com", "--shots=1,5", "--trials=3", f"--out={out}",
                     "--plot_embeddings=family"])
    assert code == 0
    records = _records(out)  # a folder named "images" goes by its parent's name
    five = records[("held_out", "5_shot_top1")]
    assert five["mean"] >= 95.0 and five["trials"] == 3  # random features still separate colours
    assert records[("held_out", "5_shot_linear_top1")]["mean"] >= 90.0
    for metric in ("zero_shot_top1", "zero_shot_top5", "1_shot_top1", "zero_shot_top1_genus",
                   "zero_shot_top1_kingdom", "zero_shot_mistake_distance", "5_shot_top1_family"):
        record = records[("held_out", metric)]
        zero = metric.startswith("zero")
        assert set(record) == {"dataset", "metric", "mean", "std", "trials"} | ({"text_type"} if zero else set())
        assert record.get("text_type") == ("taxon_com" if zero else None)
    assert records[("held_out", "zero_shot_top5")]["mean"] == 100.0  # only 4 classes
    for rank_pair in (("genus", "family"), ("family", "kingdom")):
        lower, higher = (records[("held_out", f"zero_shot_top1_{r}")]["mean"] for r in rank_pair)
        assert lower <= higher
    about = results.read_about(str(out))
    assert about["model"] == {"source": "random", "step": None, "architecture": "ViT-Tiny-8"}
    assert (about["text_types"], about["templates"], about["shots"]) == (["taxon_com"], "openai", [1, 5])
    assert about["datasets"] == [{"name": "held_out", "source": f"folder:{colour_folder}", "path": str(colour_folder),
                                  "taxa": str(colour_folder.parent / "taxa.csv"), "classes": 4, "images": 28}]
    table = (tmp_path / "res" / "results.md").read_text()
    assert "| held_out | taxon_com |" in table and "Accuracy per rank" in table
    assert f"- dataset held_out: {colour_folder}" in table and "templates: openai" in table
    assert (tmp_path / "res" / "results.png").stat().st_size > 1000
    assert (tmp_path / "res" / "results_held_out_family.png").stat().st_size > 1000
    assert "| dataset |" in capsys.readouterr().out


LINEAGE = {line.split(",")[5] + " " + line.split(",")[6]: line.split(",")[:7] for line in TAXA.splitlines()[1:]}
COMMON = {line.split(",")[5] + " " + line.split(",")[6]: line.split(",")[7] for line in TAXA.splitlines()[1:]}
MIXED_SEED = 11  # random ViT-Tiny-8 weights whose zero-shot guesses differ by class: one right, the others wrong
                 # within the order or the kingdom, or across kingdoms


def _zero_shot_by_hand(model, folder) -> tuple[list[str], list[str]]:
    """(true, predicted) species of every image from the model's own encoders: one plain prompt per
    common name, cosine similarity, argmax."""
    species = sorted(COLOURS)
    tokens = bioclip_jax.get_tokenizer("ViT-Tiny-8")([f"a photo of {COMMON[name]}." for name in species])
    texts = np.asarray(model.encode_text(tokens, normalize=True))
    preprocess = bioclip_jax.image_transform(model)
    true, pixels = [], []
    for name in species:
        for file in sorted(os.listdir(folder / name)):
            true.append(name)
            pixels.append(preprocess(Image.open(folder / name / file)))
    images = np.asarray(model.encode_image(np.stack(pixels), normalize=True))
    return true, [species[i] for i in np.argmax(images @ texts.T, axis=1)]


def _shared_ranks(a: str, b: str) -> int:
    """How many ranks, from kingdom down, two species share."""
    shared = 0
    while shared < 7 and LINEAGE[a][shared] == LINEAGE[b][shared]:
        shared += 1
    return shared


def test_zero_shot_scores_are_the_models_own_predictions_scored_per_rank(colour_folder, tmp_path):
    """Every zero-shot number equals what the model's encoders predict, counted by hand: top-1, the
    accuracy at each rank (a species prediction is right at a rank when the lineages agree down to it)
    and the mean mistake distance (1 = same genus ... 7 = another kingdom)."""
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=MIXED_SEED)
    bioclip_jax.save_model(model, tmp_path / "model")
    out = tmp_path / "zero.json"
    assert cli.main([f"--pretrained={tmp_path / 'model'}", "--no_progress", f"--data=folder:{colour_folder}",
                     "--tasks=zero_shot", "--templates=single", "--text_type=com", f"--out={out}", "--no_plot"]) == 0
    records = {metric: r["mean"] for (_, metric), r in _records(out).items()}
    true, predicted = _zero_shot_by_hand(model, colour_folder)
    assert len(set(predicted)) == 3 and 0 < sum(t == p for t, p in zip(true, predicted)) < len(true)
    for depth, rank in enumerate(("kingdom", "phylum", "class", "order", "family", "genus"), start=1):
        right = [_shared_ranks(t, p) >= depth for t, p in zip(true, predicted)]
        assert records[f"zero_shot_top1_{rank}"] == pytest.approx(100 * np.mean(right), abs=1e-3), rank
    assert records["zero_shot_top1"] == pytest.approx(100 * np.mean([t == p for t, p in zip(true, predicted)]),
                                                      abs=1e-3)
    distances = [7 - _shared_ranks(t, p) for t, p in zip(true, predicted) if t != p]
    assert records["zero_shot_mistake_distance"] == pytest.approx(np.mean(distances), abs=1e-3)
    assert records["zero_shot_top5"] == 100.0  # 4 classes: every class is in the top 5

def test_config_file_overrides_and_missing_dataset(colour_folder, tmp_path, capsys):
    config = tmp_path / "suite.py"
    config.write_text(
        "from bioclip_jax.evaluate.config import default_config\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.tasks = 'few_shot'\n"
        "    c.shots = (1,)\n"
        f"    c.datasets = [dict(name='colours', data='folder:{colour_folder}', taxa='', label_key=''),\n"
        "                  dict(name='gone', data='folder:' + arg, taxa='', label_key='')]\n"
        "    return c\n")
    out = tmp_path / "suite.json"
    code = cli.main([f"--config={config}:{tmp_path}/nowhere", *TINY, f"--out={out}", "--config.trials=2", "--no_plot"])
    assert code == 0
    assert "skipped dataset gone" in capsys.readouterr().err
    records = _records(out)
    assert list(records) == [("colours", "1_shot_top1"), ("colours", "1_shot_top1_genus"),
                             ("colours", "1_shot_top1_family"), ("colours", "1_shot_top1_order"),
                             ("colours", "1_shot_top1_class"), ("colours", "1_shot_top1_phylum"),
                             ("colours", "1_shot_top1_kingdom"), ("colours", "1_shot_mistake_distance")]
    assert records[("colours", "1_shot_top1")]["trials"] == 2
    assert not (tmp_path / "suite.png").exists()
    assert cli.main([f"--config={config}:x", "--config.no_such_field=1"]) == 2
    assert "unknown config field 'no_such_field'" in capsys.readouterr().err
    assert cli.main([*TINY, f"--data=folder:{colour_folder}", "--text_type=latin"]) == 2


def test_tfds_dataset_zero_shot(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    out = tmp_path / "tfds.json"
    with tfds.testing.mock_data(num_examples=6):
        code = cli.main([*TINY, "--data=tfds:oxford_flowers102:test", "--tasks=zero_shot", "--templates=single",
                         "--text_type=com", f"--out={out}"])
    assert code == 0
    records = _records(out)
    assert set(records) == {("oxford_flowers102:test", "zero_shot_top1"), ("oxford_flowers102:test", "zero_shot_top5")}


def test_watch_workdir_evaluates_each_checkpoint_once(colour_folder, tmp_path, capsys):
    workdir = tmp_path / "run"
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=1)
    model_dir.write_model_json(str(workdir), *model_metadata(model))
    model_dir.save_params(str(workdir / "checkpoints" / "10"), flat_params(model))
    os.makedirs(workdir / "checkpoints" / "20.orbax-checkpoint-tmp-123")  # unfinished: ignored
    args = ["--workdir", str(workdir), "--watch", "--watch_timeout=0", "--poll_seconds=0.01", "--no_progress",
            f"--data=folder:{colour_folder}", "--tasks=few_shot", "--shots=1", "--trials=1", "--no_plot"]
    assert cli.main(args) == 0
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["step"] == 10
    assert lines[0]["eval/held_out/1_shot_top1"] > 50.0
    assert results.read_json(str(workdir / "eval" / "10" / "results.json"))
    assert results.read_about(str(workdir / "eval" / "10" / "results.json"))["model"]["step"] == 10
    assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))
    assert cli.main(args) == 0  # nothing new: no second evaluation
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 1
    assert "evaluating step 10" in capsys.readouterr().out  # progress: stdout, with the results


def test_workdir_results_go_into_the_run_with_its_text_types(colour_folder, tmp_path, monkeypatch, capsys):
    """`eval --workdir RUN` writes RUN/eval/<step>/results.* (not into the current folder), scores the text
    types the run lists, and says when it replaces earlier results."""
    workdir = tmp_path / "run"
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=1)
    model_dir.write_model_json(str(workdir), *model_metadata(model))
    model_dir.save_params(str(workdir / "checkpoints" / "10"), flat_params(model))
    (workdir / "config.json").write_text(json.dumps({"eval": {
        "held_out_dir": str(colour_folder), "taxa_file": str(colour_folder.parent / "taxa.csv"),
        "text_type": "taxon_com,sci,com"}}))
    monkeypatch.chdir(tmp_path)
    args = ["--workdir", str(workdir), "--no_progress", "--tasks=zero_shot", "--templates=single", "--no_plot"]
    assert cli.main(args) == 0
    out = workdir / "eval" / "10" / "results.json"
    assert results.read_about(str(out))["text_types"] == ["taxon_com", "sci", "com"]
    assert (workdir / "eval" / "10" / "results.md").is_file() and not (tmp_path / "results.json").exists()
    assert "replaced" not in capsys.readouterr().err
    assert cli.main([*args, "--text_type=com"]) == 0  # the flag wins; the earlier files are replaced, and said so
    assert results.read_about(str(out))["text_types"] == ["com"]
    assert f"replaced the earlier results.json, results.md in {out.parent}" in capsys.readouterr().err
    assert cli.main([*args, f"--out={tmp_path / 'mine' / 'r.json'}"]) == 0
    assert results.read_about(str(tmp_path / "mine" / "r.json"))["text_types"] == ["taxon_com", "sci", "com"]
