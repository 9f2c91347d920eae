"""Export/import round trips: open_clip loads our folders; tensors survive bit for bit."""

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.numpy import load_file

from bioclip_jax import create_model, export_open_clip, save_model
from bioclip_jax.cli import main as cli
from bioclip_jax.models.params import flat_params
from openclip_helpers import random_inputs, random_open_clip, relative_error, save_safetensors, torch_features


def _same_params(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


def test_random_model_export_loads_in_open_clip(tmp_path):
    model = create_model("ViT-B-32-quickgelu", seed=5)
    export_open_clip(model, str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True and "mean" in config["preprocess_cfg"]

    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")
    reference.eval()
    ours_sd = load_file(str(tmp_path / "export" / "open_clip_model.safetensors"))
    torch_sd = reference.state_dict()
    assert set(ours_sd) == set(torch_sd)
    for key, value in torch_sd.items():
        assert tuple(value.shape) == ours_sd[key].shape and str(value.dtype) == "torch.float32", key

    images, tokens = random_inputs(224, batch=2, seed=6)
    ref_image, ref_text = torch_features(reference, images, tokens)
    assert relative_error(model.encode_image(images), ref_image) < 1e-5
    assert relative_error(model.encode_text(tokens), ref_text) < 1e-5


def test_import_of_export_is_bitwise(tmp_path):
    model = create_model("ViT-Tiny-8", seed=7)
    export_open_clip(model, str(tmp_path / "export"))
    _same_params(model, create_model(None, f"local-dir:{tmp_path / 'export'}"))
    save_model(model, str(tmp_path / "ckpt"))
    _same_params(model, create_model(None, str(tmp_path / "ckpt")))


def test_export_of_import_reproduces_open_clip_tensors(tmp_path):
    reference = random_open_clip("ViT-B-32", seed=8)
    original = save_safetensors(reference, str(tmp_path / "w.safetensors"))
    assert cli.main(["import", "--pretrained", str(tmp_path / "w.safetensors"), "--model", "ViT-B-32",
                     "--output", str(tmp_path / "ckpt")]) == 0
    assert cli.main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out")]) == 0
    exported = load_file(str(tmp_path / "out" / "open_clip_model.safetensors"))
    assert set(exported) == set(original)
    for key, tensor in original.items():
        np.testing.assert_array_equal(exported[key], tensor.numpy(), err_msg=key)


def test_bin_state_dict_imports_with_torch(tmp_path):
    reference = random_open_clip("ViT-B-32", seed=9)
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}},
               tmp_path / "ckpt.pt")
    model = create_model("ViT-B-32", str(tmp_path / "ckpt.pt"))
    np.testing.assert_array_equal(np.asarray(model.logit_scale[...]), reference.logit_scale.detach().numpy())


def test_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model name 'ViT-X-99'.*ViT-B-16"):
        create_model("ViT-X-99")
    with pytest.raises(FileNotFoundError, match="not found"):
        create_model("ViT-B-32", str(tmp_path / "missing.safetensors"))

    save_safetensors(random_open_clip("ViT-B-32", seed=10), str(tmp_path / "b32.safetensors"))
    with pytest.raises(ValueError, match=r"shape mismatch for 'visual.conv1.weight'.*\[768, 3, 32, 32\]"
                                         r".*\[768, 3, 16, 16\]"):
        create_model("ViT-B-16", str(tmp_path / "b32.safetensors"))
    with pytest.raises(ValueError, match="lacks .* open_clip key"):
        create_model("ViT-L-14", str(tmp_path / "b32.safetensors"))

    assert cli.main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--output", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["no-such-command"]) == 2


def test_bin_without_torch_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    (tmp_path / "w.bin").write_bytes(b"not really a pickle")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(ImportError, match="needs torch"):
        create_model("ViT-B-32", str(tmp_path / "w.bin"))
