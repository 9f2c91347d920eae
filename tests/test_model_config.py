"""Importing open_clip model configs: what bioclip_jax builds, and what it refuses rather than build wrongly."""

import dataclasses
import json
import os

import open_clip
import pytest
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from bioclip_jax import create_model, export_open_clip
from bioclip_jax.convert.state_dict_io import CONFIG_NAME
from bioclip_jax.models.config import ARCHITECTURES, from_open_clip, get_model_config

MODEL_CONFIGS = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
# open_clip's built-in ViT + text-transformer CLIPs: the configs bioclip_jax implements exactly.
SUPPORTED = [
    "ViT-B-16", "ViT-B-16-quickgelu", "ViT-B-16-plus", "ViT-B-16-plus-240", "ViT-B-32", "ViT-B-32-quickgelu",
    "ViT-B-32-256", "ViT-B-32-plus-256", "ViT-L-14", "ViT-L-14-quickgelu", "ViT-L-14-280", "ViT-L-14-336",
    "ViT-L-14-336-quickgelu", "ViT-L-16", "ViT-L-16-320", "ViT-H-14", "ViT-H-14-quickgelu", "ViT-H-14-378",
    "ViT-H-14-378-quickgelu", "ViT-H-16", "ViT-M-16", "ViT-M-32", "ViT-M-32-alt", "ViT-S-16", "ViT-S-16-alt",
    "ViT-S-32", "ViT-S-32-alt", "ViT-bigG-14", "ViT-bigG-14-quickgelu", "ViT-e-14", "ViT-g-14",
]


def _open_clip_config(name: str) -> dict:
    with open(os.path.join(MODEL_CONFIGS, f"{name}.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _all_names() -> list[str]:
    return sorted(name[:-len(".json")] for name in os.listdir(MODEL_CONFIGS) if name.endswith(".json"))


@pytest.mark.parametrize("name", SUPPORTED)
def test_supported_open_clip_configs_import(name):
    config = from_open_clip(_open_clip_config(name))
    if name in ARCHITECTURES:
        assert config == get_model_config(name)


@pytest.mark.parametrize("name", sorted(set(_all_names()) - set(SUPPORTED)))
def test_other_open_clip_configs_are_refused_in_one_sentence(name):
    with pytest.raises(ValueError) as refused:
        from_open_clip(_open_clip_config(name), source=f"{name}.json")
    message = str(refused.value)
    assert "\n" not in message and ("not supported" in message or "unknown to bioclip_jax" in message)


def test_every_open_clip_field_at_its_default_is_harmless():
    """A config that spells out all of open_clip's fields (timm_*, hf_*, tokenizer, pooler) at their
    defaults builds the same model as one that leaves them out."""
    plain = _open_clip_config("ViT-B-16")
    spelled_out = {**plain, "custom_text": False, "nonscalar_logit_scale": False,
                   "vision_cfg": {**dataclasses.asdict(CLIPVisionCfg()), **plain["vision_cfg"]},
                   "text_cfg": {**dataclasses.asdict(CLIPTextCfg()), **plain["text_cfg"]}}
    assert from_open_clip(spelled_out) == from_open_clip(plain) == get_model_config("ViT-B-16")


@pytest.mark.parametrize("section, key, value", [
    ("text_cfg", "norm_kwargs", {"eps": 1e-6}),
    ("vision_cfg", "act_kwargs", {"approximate": "tanh"}),
    ("vision_cfg", "qk_norm", True),
    ("text_cfg", "tokenizer_kwargs", {"clean": "canonicalize"}),
    ("vision_cfg", "a_future_option", 1),
    (None, "init_logit_scale", 2.0),
    (None, "custom_text", True),
])
def test_a_key_that_would_change_the_model_is_refused_by_name(section, key, value):
    config = _open_clip_config("ViT-B-16")
    (config[section] if section else config)[key] = value
    name = f"{section}.{key}" if section else key
    with pytest.raises(ValueError, match=rf"^open_clip {name}=.* in /models/bioclip/open_clip_config.json is "):
        from_open_clip(config, source="/models/bioclip/open_clip_config.json")


def test_a_folder_whose_config_would_build_another_model_is_refused_naming_it(tmp_path):
    export_open_clip(create_model("ViT-Tiny-8", seed=0), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    meta["model_cfg"]["text_cfg"]["norm_kwargs"] = {"eps": 1e-6}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"^open_clip text_cfg.norm_kwargs=.* in {tmp_path} is not supported"):
        create_model(f"local-dir:{tmp_path}")
