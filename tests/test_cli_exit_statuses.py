"""One table of exit statuses (bioclip_jax/exit_codes.py) for every command: 0 done, 1 failed,
2 usage or input error (a missing file is one), 75 stopped, 130 interrupted."""

import types

import pytest
from PIL import Image

import bioclip_jax
from bioclip_jax import exit_codes
from bioclip_jax.cli import main as cli
from bioclip_jax.convert import state_dict_io

CATALOG = ("kingdom,phylum,class,order,family,genus,species,common\n"
           "Animalia,Chordata,Aves,Passeriformes,Corvidae,Corvus,corax,raven\n")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """An image, a catalog, and an open_clip folder whose weights are cut in half."""
    root = tmp_path_factory.mktemp("statuses")
    (root / "images" / "Corvus corax").mkdir(parents=True)
    Image.new("RGB", (32, 32), (10, 20, 30)).save(root / "images" / "Corvus corax" / "0.png")
    (root / "catalog.csv").write_text(CATALOG)
    bioclip_jax.export_open_clip(bioclip_jax.create_model("ViT-Tiny-8", seed=1), str(root / "damaged"))
    weights = root / "damaged" / state_dict_io.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return root


def _missing(root, tmp):
    """Each command naming a file that does not exist."""
    nope = str(tmp / "nope")
    return {
        "embed": ["embed", "--model", "ViT-Tiny-8", "--images", nope, "--output", f"{tmp}/x.npy"],
        "embed-taxa": ["embed-taxa", "--taxa", f"{nope}.csv", "--output", f"{tmp}/tol", "--model", "ViT-Tiny-8"],
        "eval": ["eval", f"--config={nope}.py"],
        "export": ["export", "--checkpoint", nope, "--output", f"{tmp}/out"],
        "import": ["import", "--pretrained", f"{nope}.safetensors", "--model", "ViT-Tiny-8", "--output", f"{tmp}/c"],
        "predict": ["predict", nope, "--model", "ViT-Tiny-8", "--cls", "a,b"],
        "train": ["train", f"--config={nope}.py", f"--workdir={tmp}/run"],
    }


@pytest.mark.parametrize("command", ["embed", "embed-taxa", "eval", "export", "import", "predict", "train"])
def test_a_missing_file_is_an_input_error(inputs, tmp_path, capsys, command):
    assert cli.main(_missing(inputs, tmp_path)[command]) == exit_codes.USAGE
    assert "nope" in capsys.readouterr().err.strip().splitlines()[-1]


def _damaged_model(root, tmp):
    """Each command whose model cannot be read: the work fails, the command line was right."""
    model = f"local-dir:{root / 'damaged'}"
    return {
        "embed": ["embed", "--pretrained", model, "--images", str(root / "images"), "--output", f"{tmp}/x.npy",
                  "--no-progress"],
        "embed-taxa": ["embed-taxa", "--taxa", str(root / "catalog.csv"), "--output", f"{tmp}/tol",
                       "--pretrained", model,
                       "--no-progress"],
        "eval": ["eval", f"--pretrained={model}", f"--data=folder:{root / 'images'}", f"--output={tmp}/r.json",
                 "--no-progress"],
        "predict": ["predict", str(root / "images"), "--pretrained", model, "--cls", "a,b", "--no-progress"],
    }


@pytest.mark.parametrize("command", ["embed", "embed-taxa", "eval", "predict"])
def test_a_failed_run_is_status_1(inputs, tmp_path, capsys, command):
    assert cli.main(_damaged_model(inputs, tmp_path)[command]) == exit_codes.ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(inputs / "damaged") in err[0], err


def test_ctrl_c_is_status_130_without_a_traceback(monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_module", "a command the user interrupts"))
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: types.SimpleNamespace(main=interrupted))
    assert cli.main(["fake"]) == exit_codes.ABORTED == 130
    assert capsys.readouterr().err == "bioclip-jax fake: interrupted\n"


def test_the_table_and_its_page_say_the_same():
    page = open("docs/exit_statuses.md").read()
    for name in ("FINISHED", "ERROR", "USAGE", "STOPPED", "ABORTED"):
        assert f"| {getattr(exit_codes, name)} | `{name}` |" in page, name
