"""Import of randomly initialised open_clip models: same embeddings and logits in fp32."""

import numpy as np
import pytest
import torch

from bioclip_jax import create_model
from openclip_helpers import random_inputs, random_open_clip, relative_error, save_safetensors, torch_features

# Measured: ~1e-6 relative for every architecture here (fp32 round-off, different op order).
TOLERANCE = 1e-5


# BioCLIP's ViT-B-16-quickgelu and plain ViT-B-32 run by default; the other two (slow) only swap the activation.
@pytest.mark.parametrize("name", ["ViT-B-32", pytest.param("ViT-B-32-quickgelu", marks=pytest.mark.slow),
                                  pytest.param("ViT-B-16", marks=pytest.mark.slow), "ViT-B-16-quickgelu"])
def test_embeddings_and_logits_match_open_clip(name, tmp_path):
    reference = random_open_clip(name, seed=1)
    save_safetensors(reference, str(tmp_path / "w.safetensors"))
    model = create_model(name, str(tmp_path / "w.safetensors"))

    images, tokens = random_inputs(224, batch=2, seed=2)
    ref_image, ref_text = torch_features(reference, images, tokens)
    ours_image, ours_text = model.encode_image(images), model.encode_text(tokens)
    assert relative_error(ours_image, ref_image) < TOLERANCE
    assert relative_error(ours_text, ref_text) < TOLERANCE

    with torch.no_grad():
        ref_logits, _ = reference.get_logits(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()),
                                             torch.from_numpy(tokens))
    ours_logits = np.exp(float(model.logit_scale[...])) * (
        model.encode_image(images, normalize=True) @ model.encode_text(tokens, normalize=True).T)
    np.testing.assert_allclose(ours_logits, ref_logits.numpy(), rtol=1e-4, atol=1e-4)


def test_quickgelu_matters(tmp_path):
    """The same weights through GELU and QuickGELU towers differ: the flag is really used."""
    reference = random_open_clip("ViT-B-32-quickgelu", seed=3)
    save_safetensors(reference, str(tmp_path / "w.safetensors"))
    images, tokens = random_inputs(224, batch=1, seed=4)
    quick = create_model("ViT-B-32-quickgelu", str(tmp_path / "w.safetensors")).encode_text(tokens)
    plain = create_model("ViT-B-32", str(tmp_path / "w.safetensors")).encode_text(tokens)
    assert relative_error(plain, quick) > 1e-3
