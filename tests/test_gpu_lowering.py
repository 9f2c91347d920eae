"""The GPU training path, checked on a CPU machine: the bf16 training gradient lowers for CUDA with
cuDNN attention at the towers' real lengths, the padding it needs changes nothing, and the
activations kept for the backward pass stay near their bf16 minimum."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src import ad_checkpoint
from jax._src.cudnn import fused_attention_stablehlo

from bioclip_jax.models import attention, layers, remat
from bioclip_jax.models.clip import abstract_model, build_model
from bioclip_jax.models.config import get_model_config
from bioclip_jax.models.layers import MATMUL_OUTPUTS
from bioclip_jax.models.saved_activations import saved_bytes_per_pair, tower_inputs, tower_loss

CUDNN_CALLS = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


@pytest.fixture
def cudnn_present(monkeypatch):
    """A CPU machine has no cuDNN to ask for its version; lowering needs only the number."""
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 90800)


@pytest.mark.parametrize("name, tower", [("ViT-B-16", "image"), ("ViT-L-14", "image"), ("ViT-B-16", "text")])
def test_bf16_training_gradient_lowers_for_cuda_with_cudnn_attention(cudnn_present, name, tower):
    arch = get_model_config(name)
    model = abstract_model(arch, dtype=jnp.bfloat16, attention="cudnn", scan_layers=True)
    loss, params = tower_loss(model, tower)
    lowered = jax.jit(jax.value_and_grad(loss)).trace(params, tower_inputs(arch, tower, 2)).lower(
        lowering_platforms=("cuda",))
    targets = set(re.findall(r'custom_call @(__cudnn\$\w+)', lowered.as_text()))
    assert set(CUDNN_CALLS) <= targets


def test_unpadded_cudnn_lengths_are_what_jax_refuses(cudnn_present):
    """Why the towers pad: 197 image tokens (ViT-B/16) fail cuDNN's training check, 198 pass."""
    q = jax.ShapeDtypeStruct((2, 197, 12, 64), jnp.bfloat16)
    loss = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn").astype(jnp.float32).sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="197"):
        jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",))


def test_the_padded_path_equals_the_unpadded_one_in_outputs_and_gradients(monkeypatch):
    """Both towers padded by one token (as for cuDNN), run with the einsum kernel: same numbers."""
    arch = get_model_config("ViT-Tiny-8")
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    tokens = rng.integers(1, 1000, (2, 77)).astype(np.int32)
    tokens[:, 9], tokens[:, 10:] = 49407, 0

    def features_and_grads():
        model = build_model(arch, seed=3, attention="xla")
        graphdef, params = nnx.split(model)

        def loss(p):
            merged = nnx.merge(graphdef, p)
            image, text = merged.image_features(images), merged.text_features(tokens)
            return jnp.sum(image * text), (image, text)

        (_, features), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return features, jax.tree.leaves(grads)

    plain, plain_grads = features_and_grads()
    padded_lengths = []
    monkeypatch.setattr(attention, "padded_length", lambda tokens, kernel: padded_lengths.append(tokens) or tokens + 1)
    padded, padded_grads = features_and_grads()
    assert sorted(set(padded_lengths)) == [65, 77]  # both towers went through the padding
    for a, b in zip(padded, plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # fp32 round-off of other matmul shapes, relative to the largest gradient (the key bias's is
    # zero in exact arithmetic: softmax ignores a shift shared by all keys).
    scale = max(np.abs(np.asarray(g)).max() for g in plain_grads)
    for a, b in zip(padded_grads, plain_grads):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * scale


def test_vit_b16_keeps_at_most_100_mib_per_pair_in_bf16_without_remat():
    mib = 2.0 ** 20
    arch = get_model_config("ViT-B-16")
    image, text = (saved_bytes_per_pair(arch, tower, attention="xla", remat="none") for tower in ("image", "text"))
    assert (image + text) / mib <= 100, f"image {image / mib:.1f} + text {text / mib:.1f} MiB per pair"


def test_minimal_remat_keeps_only_the_named_matmul_outputs_and_the_block_inputs():
    arch = get_model_config("ViT-Tiny-8")
    model = abstract_model(arch, attention="xla", remat="minimal", scan_layers=False)
    loss, params = tower_loss(model, "image")
    sources = [source for _, source in ad_checkpoint.saved_residuals(loss, params, tower_inputs(arch, "image", 2))
               if "from the argument" not in source]
    named = [s for s in sources if "named" in s]
    # mlp_out feeds only the residual add, whose backward pass needs nothing kept.
    assert {re.search(r"named '(\w+)'", s).group(1) for s in named} == set(MATMUL_OUTPUTS) - {"mlp_out"}
    assert remat.SAVEABLE_NAMES == MATMUL_OUTPUTS
    # The minimal policy keeps less than none and more than full.
    per_pair = {choice: saved_bytes_per_pair(arch, "image", remat=choice, dtype=jnp.float32)
                for choice in ("none", "minimal", "full")}
    assert per_pair["full"] < per_pair["minimal"] < per_pair["none"]


def _plain_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + 1e-5) * scale + bias


@pytest.mark.parametrize("ours, plain", [
    (layers.layer_norm, _plain_layer_norm),
    (lambda x, s, b: layers.exact_gelu(x) * s + b, lambda x, s, b: jax.nn.gelu(x, approximate=False) * s + b),
    (lambda x, s, b: layers.quick_gelu(x) * s + b, lambda x, s, b: x * jax.nn.sigmoid(1.702 * x) * s + b),
    (lambda x, s, b: attention.softmax_weights(x, jnp.float32) * s + b, lambda x, s, b: jax.nn.softmax(x) * s + b),
], ids=["layer_norm", "exact_gelu", "quick_gelu", "softmax"])
def test_hand_written_backward_passes_equal_autodiff_of_the_formula(ours, plain):
    rng = np.random.default_rng(0)
    x, scale, bias = (jnp.asarray(rng.standard_normal(shape) * 2, jnp.float32) for shape in ((3, 5, 16), (16,), (16,)))
    cotangent = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    np.testing.assert_allclose(ours(x, scale, bias), plain(x, scale, bias), rtol=1e-6, atol=1e-6)
    ours_grads = jax.vjp(ours, x, scale, bias)[1](cotangent)
    plain_grads = jax.vjp(plain, x, scale, bias)[1](cotangent)
    for a, b in zip(ours_grads, plain_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
