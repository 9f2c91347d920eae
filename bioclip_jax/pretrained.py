"""Building models from a name and a `pretrained=` source, the same way everywhere.

Accepted sources:
  None or "random"                 random initialisation (seeded) of `model_name`
  hf-hub:ORG/NAME[@REVISION]       an open_clip model repo on the Hugging Face Hub, through
                                   huggingface_hub's cache (HF_HOME, HF_HUB_OFFLINE, token)
  local-dir:PATH or PATH/          an open_clip hf-hub folder (open_clip_config.json + weights)
  PATH.safetensors                 an open_clip state dict (architecture from `model_name`)
  PATH.bin / .pt / .pth            a PyTorch state dict (needs torch installed)
  PATH/ with bioclip_jax_model.json  a bioclip_jax model directory or training workdir
                                     (its latest finished step, or `step=`)
PATH may be local or in a bucket (gs://bucket/run).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from etils import epath

from bioclip_jax import hub
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.convert import names, state_dict_io
from bioclip_jax.models.clip import CLIP, abstract_model, build_model
from bioclip_jax.models.config import CLIPConfig, from_open_clip, get_model_config, to_open_clip
from bioclip_jax.models.params import assign_params, flat_params, param_shapes
from bioclip_jax.sources import LOCAL_DIR, RANDOM, is_source
from bioclip_jax.transforms import PYBIOCLIP_TREE_OF_LIFE, ImageTransform, PreprocessConfig

DEFAULT_ARCHITECTURE = "ViT-B-16"


@dataclasses.dataclass
class Loaded:
    """What a source provides: architecture, preprocessing, and flat parameters (or None)."""

    config: CLIPConfig
    preprocess: PreprocessConfig
    params: dict | None
    source: str


def _strip_schema(source: str) -> str:
    """A local (or bucket) path for any source; a hub source is fetched into the Hugging Face cache."""
    if hub.is_hub(source):
        return hub.model_folder(source)
    return source[len(LOCAL_DIR):] if source.startswith(LOCAL_DIR) else source


def _config_for(model_name: str | None, source: str) -> CLIPConfig:
    if model_name is None:
        raise ValueError(f"{source} carries no architecture; pass the model name (e.g. ViT-B-16)")
    return get_model_config(model_name)


def _described(meta: dict, source: str) -> tuple[CLIPConfig, PreprocessConfig]:
    """Architecture and preprocessing from {"model_cfg": ..., "preprocess_cfg": ...} (read from `source`)."""
    config = from_open_clip(meta["model_cfg"], source)
    return config, PreprocessConfig.from_open_clip(meta.get("preprocess_cfg", {}), config.vision.image_size)


def load_source(pretrained: str, model_name: str | None = None, *, step: int | None = None) -> Loaded:
    """Reads a pretrained source into numpy parameters in bioclip_jax's layout.

    `step` picks a checkpoint of a training workdir (default: its latest finished one).
    """
    path = _strip_schema(str(pretrained))
    is_dir = epath.Path(path).is_dir()
    if is_dir and model_dir.is_model_dir(path):
        config, preprocess = _described(model_dir.read_model_json(path), path)
        return Loaded(config, preprocess, model_dir.load_params(path, step), path)
    if step is not None:
        raise ValueError(f"step={step} applies to a bioclip_jax training workdir; {pretrained} is not one")
    if is_dir:
        config, preprocess = _described(state_dict_io.read_open_clip_config(path), path)
        weights = state_dict_io.find_weights_in_dir(path)
    elif epath.Path(path).is_file():
        config = _config_for(model_name, path)
        preprocess = PreprocessConfig(size=config.vision.image_size)
        weights = path
    else:
        raise FileNotFoundError(f"pretrained source not found: {pretrained}")
    state_dict = state_dict_io.read_state_dict(weights)
    shapes = param_shapes(abstract_model(config))
    params = names.from_torch_state_dict(config, state_dict, shapes, source=weights)
    return Loaded(config, preprocess, params, weights)


def create_model(model_name: str | None = DEFAULT_ARCHITECTURE, pretrained: str | None = None, *, seed: int = 0,
                 dtype=jnp.float32, remat: bool | str = False, attention: str = "auto",
                 step: int | None = None) -> CLIP:
    """open_clip-style constructor, the one every command and the library build models with.

    The architecture comes from the source when it has one; `pretrained=None` or "random" gives
    seeded random weights of `model_name` (default ViT-B-16).

    `step` picks a checkpoint when `pretrained` is a training workdir (default: the latest).
    As in open_clip, `model_name` may itself be a source (`hf-hub:ORG/NAME`, `local-dir:PATH`).
    `remat` and `attention` choose how it computes (see `bioclip_jax.models.clip.abstract_model`).
    """
    if is_source(model_name):
        if pretrained is not None and pretrained != model_name:
            raise ValueError(f"model {model_name} already names its weights; drop pretrained={pretrained}")
        model_name, pretrained = None, model_name
    if pretrained in (None, RANDOM):
        if step is not None:
            raise ValueError(f"step={step} needs pretrained= a training workdir")
        config = get_model_config(model_name or DEFAULT_ARCHITECTURE)
        model = build_model(config, seed=seed, dtype=dtype, remat=remat, attention=attention)
        model.preprocess = PreprocessConfig(size=config.vision.image_size)
        model.source = None
        return model
    loaded = load_source(pretrained, model_name, step=step)
    # Every parameter is assigned below.
    model = abstract_model(loaded.config, dtype=dtype, remat=remat, attention=attention)
    assign_params(model, loaded.params, source=loaded.source)
    model.preprocess = loaded.preprocess
    model.source = str(pretrained)  # as given (hf-hub:ORG/NAME, a path, ...): says which model this is
    return model


def image_transform(model_or_name="ViT-B-16") -> ImageTransform:
    """open_clip's eval transform for a model (its preprocess_cfg) or an architecture name."""
    if isinstance(model_or_name, CLIP):
        return ImageTransform(getattr(model_or_name, "preprocess", PreprocessConfig(
            size=model_or_name.config.vision.image_size)))
    return ImageTransform(PreprocessConfig(size=get_model_config(model_or_name).vision.image_size))


def pybioclip_preprocessing(model: CLIP) -> CLIP:
    """pybioclip's two tree-of-life models are preprocessed as pybioclip does (the whole image squashed
    to 224 x 224); every other model keeps open_clip's transform."""
    if hub.tree_of_life_repo(model.source):
        model.preprocess = PYBIOCLIP_TREE_OF_LIFE
    return model


def model_metadata(model: CLIP) -> tuple[dict, dict]:
    """(open_clip model_cfg, preprocess_cfg) describing `model`."""
    preprocess = getattr(model, "preprocess", PreprocessConfig(size=model.config.vision.image_size))
    return to_open_clip(model.config), preprocess.to_open_clip()


def save_model(model: CLIP, directory) -> None:
    """A bioclip_jax model directory (see `bioclip_jax.checkpoint.model_dir`)."""
    model_cfg, preprocess_cfg = model_metadata(model)
    model_dir.save_params(directory, flat_params(model))
    model_dir.write_model_json(directory, model_cfg, preprocess_cfg)


def export_open_clip(model: CLIP, directory) -> None:
    """An open_clip hf-hub folder with open_clip's exact keys, shapes and dtypes."""
    model_cfg, preprocess_cfg = model_metadata(model)
    state_dict = names.to_torch_state_dict(model.config, flat_params(model))
    state_dict_io.write_open_clip_dir(directory, model_cfg, preprocess_cfg, state_dict)
