"""bioclip_jax: BioCLIP (a CLIP for the tree of life) in JAX/Flax.

    model = bioclip_jax.create_model("ViT-B-16", pretrained="local-dir:/path/to/open_clip_folder")
    tokenizer = bioclip_jax.get_tokenizer("ViT-B-16")
    preprocess = bioclip_jax.image_transform(model)
    image_features = model.encode_image(np.stack([preprocess(im) for im in images]))
    text_features = model.encode_text(tokenizer(["a photo of Corvus corax."]))
"""

from bioclip_jax.models.config import ARCHITECTURES, get_model_config
from bioclip_jax.pretrained import create_model, export_open_clip, image_transform, save_model
from bioclip_jax.tokenizer import get_tokenizer

__all__ = ["ARCHITECTURES", "create_model", "export_open_clip", "get_model_config", "get_tokenizer",
           "image_transform", "list_models", "save_model"]


def list_models() -> list[str]:
    return sorted(ARCHITECTURES)
