"""`hf-hub:ORG/NAME[@REVISION]` sources, read through huggingface_hub's cache with HF_HUB_OFFLINE=1."""

import argparse
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax import hub
from bioclip_jax.cli import common
from bioclip_jax.models.params import flat_params
from hub_helpers import add_model_folder, add_repo, offline_env


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_model")
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=5)
    bioclip_jax.export_open_clip(model, str(root / "model"))
    return root / "model", {k: np.asarray(v) for k, v in flat_params(model).items()}


@pytest.fixture
def cache(tmp_path, monkeypatch, exported):
    folder, _ = exported
    hf_home = tmp_path / "hf_home"
    snapshot = add_model_folder(hf_home, "someorg/tiny-clip", folder)
    offline_env(monkeypatch, hf_home)
    return hf_home, snapshot


def _same_params(model, expected):
    got = {k: np.asarray(v) for k, v in flat_params(model).items()}
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))


def test_create_model_reads_the_offline_cache(cache, exported):
    _, snapshot = cache
    model = bioclip_jax.create_model(pretrained="hf-hub:someorg/tiny-clip")
    _same_params(model, exported[1])
    assert model.source == "hf-hub:someorg/tiny-clip"
    # open_clip's spelling (the model name is the source) and a pinned revision
    _same_params(bioclip_jax.create_model("hf-hub:someorg/tiny-clip"), exported[1])
    _same_params(bioclip_jax.create_model(pretrained=f"hf-hub:someorg/tiny-clip@{snapshot.name}"), exported[1])


def test_open_clip_reads_the_same_cache(cache):
    """The cache layout is huggingface_hub's own: open_clip's hub loader finds the model in it."""
    open_clip = pytest.importorskip("open_clip")
    model, _, _ = open_clip.create_model_and_transforms("hf-hub:someorg/tiny-clip")
    assert model.visual.conv1.weight.shape[-1] == 8


def test_missing_download_is_one_sentence(cache):
    hf_home, _ = cache
    with pytest.raises(FileNotFoundError) as error:
        bioclip_jax.create_model(pretrained="hf-hub:someorg/not-cached")
    message = str(error.value)
    assert "someorg/not-cached" in message and str(hf_home / "hub") in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="dataset repo imageomics/TreeOfLife-200M"):
        hub.tree_of_life_folder("imageomics/TreeOfLife-200M")


def test_dataset_files_and_bad_names(cache, tmp_path):
    hf_home, _ = cache
    add_repo(hf_home, "imageomics/TreeOfLife-10M", {"embeddings/txt_emb_species.npy": b"x",
                                                     "embeddings/txt_emb_species.json": b"[]"}, repo_type="dataset")
    folder = hub.tree_of_life_folder(hub.tree_of_life_repo("hf-hub:imageomics/bioclip"))
    assert open(f"{folder}/txt_emb_species.json").read() == "[]"
    assert hub.tree_of_life_repo("hf-hub:imageomics/bioclip-2") == "imageomics/TreeOfLife-200M"
    assert hub.tree_of_life_repo("local-dir:/x") is None
    for bad in ("hf-hub:", "hf-hub:justname", "hf-hub:a/b/c", "hf-hub:a/b@"):
        with pytest.raises(ValueError, match="hf-hub:ORG/NAME"):
            hub.parse(bad)


def test_every_command_accepts_the_same_sources(cache, exported):
    def args(pretrained=None, model=None):
        return argparse.Namespace(pretrained=pretrained, model=model, seed=0)

    def load(args):
        return bioclip_jax.create_model(*common.model_source(args.pretrained, args.model), seed=args.seed)

    _same_params(load(args("hf-hub:someorg/tiny-clip")), exported[1])
    _same_params(load(args(model="hf-hub:someorg/tiny-clip")), exported[1])
    assert load(args("random", "ViT-Tiny-8")).config.vision.patch_size == 8
    assert load(args(model="ViT-Tiny-8")).source is None  # documented: random weights
    with pytest.raises(ValueError, match="--pretrained"):
        load(args())
    parser = argparse.ArgumentParser()
    common.add_model_args(parser)
    assert "hf-hub:ORG/NAME" in parser.format_help() and "'random'" in parser.format_help()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


UNREACHABLE_SCRIPT = """
import json, sys, time
import huggingface_hub
import bioclip_jax
from bioclip_jax import hub
from bioclip_jax.cli.main import main
start = time.monotonic()
try:
    hub.model_folder("hf-hub:someorg/not-cached")
except FileNotFoundError as error:
    message = str(error)
seconds = time.monotonic() - start
cached = bioclip_jax.create_model(pretrained="hf-hub:someorg/tiny-clip").config.vision.patch_size
print(json.dumps({"seconds": seconds, "message": message, "cached_patch": cached}), flush=True)
sys.exit(main(["predict", "--no-progress", "--pretrained", "hf-hub:someorg/not-cached", sys.argv[1]]))
"""


def test_unreachable_hub_is_one_sentence_at_once(cache, tmp_path):
    """Not offline, but the Hub's address refuses: one probe, then the cache (huggingface_hub alone retried
    each file for ~25 s and logged every retry twice). HF_HUB_OFFLINE=1: test_predict.py."""
    hf_home, _ = cache
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    Image.new("RGB", (16, 16)).save(tmp_path / "bird.jpg")
    result = subprocess.run([sys.executable, "-c", UNREACHABLE_SCRIPT, str(tmp_path / "bird.jpg")], env=env,
                            capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout.splitlines()[0])
    assert report["seconds"] < 8, report
    assert f"cannot be reached ({env['HF_ENDPOINT']}" in report["message"] and "\n" not in report["message"]
    assert str(hf_home / "hub") in report["message"]
    assert report["cached_patch"] == 8  # a cached model still loads
    assert result.returncode == 2, result.stderr  # the CLI: its one sentence, no retry warnings
    (line,) = result.stderr.splitlines()
    assert line.startswith("predict: open_clip_config.json of the Hugging Face repo someorg/not-cached"), line
