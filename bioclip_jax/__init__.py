"""bioclip_jax: BioCLIP (a CLIP for the tree of life) in JAX/Flax.

    model = bioclip_jax.create_model("ViT-B-16", pretrained="local-dir:/path/to/open_clip_folder")
    tokenizer = bioclip_jax.get_tokenizer("ViT-B-16")
    preprocess = bioclip_jax.image_transform(model)
    image_features = model.encode_image(np.stack([preprocess(im) for im in images]))
    text_features = model.encode_text(tokenizer(["a photo of Corvus corax."]))
    records = bioclip_jax.TreeOfLifeClassifier().predict("bird.jpg", rank="auto")  # pybioclip's API

Names are imported on first use, so that data-loading worker processes that import
`bioclip_jax.data` do not pay for importing jax and flax.
"""

import importlib

_EXPORTS = {
    "ARCHITECTURES": "bioclip_jax.models.config",
    "get_model_config": "bioclip_jax.models.config",
    "create_model": "bioclip_jax.pretrained",
    "export_open_clip": "bioclip_jax.pretrained",
    "image_transform": "bioclip_jax.pretrained",
    "save_model": "bioclip_jax.pretrained",
    "get_tokenizer": "bioclip_jax.tokenizer",
    "TreeOfLifeClassifier": "bioclip_jax.classify.classifiers",
    "CustomLabelsClassifier": "bioclip_jax.classify.classifiers",
    "CustomLabelsBinningClassifier": "bioclip_jax.classify.classifiers",
}

__all__ = sorted([*_EXPORTS, "list_models"])


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bioclip_jax' has no attribute {name!r}")


def list_models() -> list[str]:
    from bioclip_jax.models.config import ARCHITECTURES  # noqa: PLC0415
    return sorted(ARCHITECTURES)
