"""Every command builds its model through `create_model` and accepts the same sources."""

import numpy as np
import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax.cli import main as cli

CATALOG = """kingdom,phylum,class,order,family,genus,species,common
Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,corax,common raven
Plantae,Tracheophyta,Magnoliopsida,Rosales,Rosaceae,Rosa,canina,dog rose
"""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    bioclip_jax.export_open_clip(bioclip_jax.create_model("ViT-Tiny-8", seed=2), str(root / "model"))
    rng = np.random.default_rng(0)
    for species in ("Corvus corax", "Rosa canina"):
        (root / "images" / species).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "images" / species / f"{i}.png")
    (root / "catalog.csv").write_text(CATALOG)
    return root


def _commands(root, out):
    images = str(root / "images")
    return {
        "embed": ["embed", "--images", images, "--output", f"{out}/e.npy", "--no-progress"],
        "embed-taxa": ["embed-taxa", "--taxa", f"{root}/catalog.csv", "--output", f"{out}/tol", "--no-progress",
                       "--templates", "single"],
        "eval": ["eval", f"--data=folder:{images}", "--tasks=zero_shot", "--templates=single", f"--output={out}/r.json",
                 "--no-progress", "--no-plot"],
        "predict": ["predict", images, "--cls", "crow,rose", "--no-progress", "--output", f"{out}/p.csv"],
    }


@pytest.mark.parametrize("command", ["embed", "embed-taxa", "eval", "predict"])
@pytest.mark.parametrize("flag", ["--model", "--pretrained"])
def test_every_command_accepts_a_local_dir_source(inputs, tmp_path, command, flag):
    argv = _commands(inputs, tmp_path)[command] + [flag, f"local-dir:{inputs / 'model'}"]
    assert cli.main(argv) == 0
