"""Sharded contrastive losses equal the dense reference (value and gradient) and stay row-blocked."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bioclip_jax.parallel import batch_sharding, make_mesh
from bioclip_jax.train.loss import MAX_LOG_LOGIT_SCALE, contrastive_loss, dense_contrastive_loss

BATCH, DIM = 64, 16
MESHES = {"data=8": (8, 1), "fsdp=8": (1, 8), "data=2,fsdp=4": (2, 4)}
KINDS = {"softmax": None, "sigmoid": -4.0}


def _features(batch=BATCH, dim=DIM, seed=0):
    """Correlated image/text pairs, so the diagonal (the labels) matters to the loss."""
    image_key, noise_key = jax.random.split(jax.random.key(seed))
    images = jax.random.normal(image_key, (batch, dim))
    texts = images + 1.5 * jax.random.normal(noise_key, (batch, dim))
    return images, texts


def _loss_and_grads(loss_fn):
    """One compiled function giving ((loss, metrics), grads w.r.t. every argument)."""
    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))


@functools.cache
def _dense_reference(kind):
    """((loss, metrics), grads) of the single-device formula, computed once per kind."""

    def dense(i, t, s, b):
        return dense_contrastive_loss(i, t, s, kind=kind, logit_bias=b if kind == "sigmoid" else None)

    return _loss_and_grads(dense)(*_features(), *_scale_and_bias(kind))


def _scale_and_bias(kind):
    return jnp.float32(math.log(1 / 0.07)), jnp.float32(KINDS[kind] or 0.0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mesh_name", MESHES)
def test_sharded_loss_and_gradients_match_dense(mesh_name, kind):
    mesh = make_mesh(*MESHES[mesh_name])
    images, texts = _features()
    scale, bias = _scale_and_bias(kind)
    on_mesh = [jax.device_put(x, batch_sharding(mesh)) for x in (images, texts)]

    def sharded(i, t, s, b):
        return contrastive_loss(i, t, s, mesh, kind=kind, logit_bias=b if kind == "sigmoid" else None)

    (loss, metrics), grads = _loss_and_grads(sharded)(*on_mesh, scale, bias)
    (want_loss, want_metrics), want_grads = _dense_reference(kind)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    names = ["image", "text", "logit_scale", "logit_bias"]
    for name, got, want in zip(names, grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=name)
    for name, grad in zip(names[:3], grads[:3]):
        assert np.abs(np.asarray(grad)).max() > 1e-4, f"{name} gradient is zero"

    assert metrics.keys() == want_metrics.keys()
    for name in metrics:
        np.testing.assert_allclose(metrics[name], want_metrics[name], rtol=1e-5, err_msg=name)


def test_dense_reference_matches_open_clip():
    torch = pytest.importorskip("torch")
    from open_clip.loss import ClipLoss, SigLipLoss

    images, texts = _features(batch=12)
    scale = math.log(20.0)
    normed = [np.array(x / jnp.linalg.norm(x, axis=-1, keepdims=True)) for x in (images, texts)]
    torch_images, torch_texts = (torch.from_numpy(x) for x in normed)
    want_softmax = ClipLoss()(torch_images, torch_texts, torch.tensor(math.exp(scale))).item()
    want_sigmoid = SigLipLoss()(torch_images, torch_texts, torch.tensor(math.exp(scale)), torch.tensor(-3.0)).item()

    dense = jax.jit(dense_contrastive_loss, static_argnames="kind")
    np.testing.assert_allclose(dense(images, texts, scale)[0], want_softmax, rtol=1e-5)
    got_sigmoid = dense(images, texts, scale, kind="sigmoid", logit_bias=-3.0)[0]
    np.testing.assert_allclose(got_sigmoid, want_sigmoid, rtol=1e-5)


def _square_shapes(hlo_text: str, size: int) -> list[str]:
    return re.findall(rf"\w+\[{size},{size}\]", hlo_text)


@pytest.mark.parametrize("kind", KINDS)
def test_no_global_logit_matrix_on_any_device(kind):
    batch, dim = 128, 24
    mesh = make_mesh(2, 4)
    features = jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=batch_sharding(mesh))
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    bias = -4.0 if kind == "sigmoid" else None
    step = jax.jit(jax.value_and_grad(lambda i, t, s: contrastive_loss(i, t, s, mesh, kind=kind, logit_bias=bias)[0]))
    hlo = step.lower(features, features, scalar).compile().as_text()
    assert not _square_shapes(hlo, batch), "a [B_global, B_global] array is materialised on a device"
    assert re.search(rf"\[{batch // 8},{batch}\]", hlo), "expected per-device [B/8, B] logit blocks"

    # The detector does find the matrix when the dense reference builds it.
    dense = jax.jit(jax.value_and_grad(lambda i, t, s: dense_contrastive_loss(i, t, s, kind=kind, logit_bias=bias)[0]))
    plain = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    assert _square_shapes(dense.lower(plain, plain, scalar).compile().as_text(), batch)


def test_logit_scale_is_clamped_at_ln_100():
    images, texts = _features(batch=8)
    loss_at = jax.jit(jax.value_and_grad(lambda s: dense_contrastive_loss(images, texts, s)[0]))
    at_max, grad_at_max = loss_at(jnp.float32(MAX_LOG_LOGIT_SCALE))
    above, grad_above = loss_at(jnp.float32(MAX_LOG_LOGIT_SCALE + 1.0))
    np.testing.assert_allclose(above, at_max, rtol=1e-6)
    assert grad_above == 0.0
    assert abs(grad_at_max) > 1e-4, "the gradient must still flow at exactly ln(100), where CLIP starts"
    used_scale = jax.jit(lambda s: dense_contrastive_loss(images, texts, s)[1]["logit_scale"])
    np.testing.assert_allclose(used_scale(jnp.float32(9.0)), 100.0, rtol=1e-5)


def test_bad_inputs_give_clear_errors():
    mesh = make_mesh(8)
    images, texts = _features(batch=12)
    with pytest.raises(ValueError, match="does not split evenly over 8"):
        contrastive_loss(images, texts, 1.0, mesh)
    with pytest.raises(ValueError, match="same shape"):
        contrastive_loss(images, texts[:, :4], 1.0, mesh)
    with pytest.raises(ValueError, match="unknown"):
        dense_contrastive_loss(images, texts, 1.0, kind="hinge")
    with pytest.raises(ValueError, match="logit_bias"):
        dense_contrastive_loss(images, texts, 1.0, kind="sigmoid")
