"""The CLIP model: two towers plus a learned temperature, with open_clip's interface."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bioclip_jax.models import attention
from bioclip_jax.models.attention import AUTO
from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.models.layers import Init
from bioclip_jax.models.towers import TextTransformer, VisionTransformer

INIT_LOGIT_SCALE = math.log(1 / 0.07)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x32 = x.astype(jnp.float32)
    return x32 / jnp.maximum(jnp.linalg.norm(x32, axis=-1, keepdims=True), eps)


class CLIP(nnx.Module):
    """Image and text towers mapping into one `embed_dim` space.

    `image_features` / `text_features` are the traced computations used inside jitted
    training and evaluation code. `encode_image` / `encode_text` are the eager,
    open_clip-style entry points: they take numpy arrays and run one compiled call.
    """

    def __init__(self, config: CLIPConfig, *, dtype=jnp.float32, remat: bool | str = False,
                 scan_layers: bool = False, attention: str = AUTO, replay_projector: bool = False,
                 rngs: nnx.Rngs):
        self.config = config
        how = dict(dtype=dtype, remat=remat, scan_layers=scan_layers, attention=attention, rngs=rngs)
        self.visual = VisionTransformer(config.vision, config.embed_dim, quick_gelu=config.quick_gelu,
                                        replay_projector=replay_projector, **how)
        self.text = TextTransformer(config.text, config.embed_dim, quick_gelu=config.quick_gelu, **how)
        self.logit_scale = _scalar_param(INIT_LOGIT_SCALE)
        if config.init_logit_bias is not None:
            self.logit_bias = _scalar_param(config.init_logit_bias)

    def image_features(self, images: jax.Array, normalize: bool = False, projector: str = "proj") -> jax.Array:
        features = self.visual(images, projector).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def text_features(self, tokens: jax.Array, normalize: bool = False) -> jax.Array:
        features = self.text(tokens).astype(jnp.float32)
        return l2_normalize(features) if normalize else features

    def __call__(self, images: jax.Array, tokens: jax.Array):
        """Normalised image and text features plus the (unclamped) temperature, like open_clip."""
        return (self.image_features(images, True), self.text_features(tokens, True),
                jnp.exp(self.logit_scale[...]))

    def encode_image(self, images, normalize: bool = False) -> np.ndarray:
        """[B, H, W, 3] float images normalised with the CLIP mean/std -> [B, embed_dim]."""
        attention.require_runnable(self.visual.transformer.attention_kernel)
        graphdef, state = nnx.split(self)
        return np.asarray(_encode(graphdef, state, jnp.asarray(images, jnp.float32), "image", normalize))

    def encode_text(self, tokens, normalize: bool = False) -> np.ndarray:
        """[B, context_length] int token ids -> [B, embed_dim].

        Rows are cut after the last end-of-text token of the batch (rounded up to a
        multiple of 16, so few shapes compile): the result is the same, and short
        captions such as taxon names cost a fraction of the full 77 positions.
        """
        attention.require_runnable(self.text.transformer.attention_kernel)
        tokens = np.asarray(tokens)
        graphdef, state = nnx.split(self)
        trimmed = tokens[:, :used_text_length(tokens, self.config.text.context_length)]
        return np.asarray(_encode(graphdef, state, jnp.asarray(trimmed, jnp.int32), "text", normalize))


def used_text_length(tokens: np.ndarray, context_length: int, multiple: int = 16) -> int:
    """Positions up to the last end-of-text token (the row maximum), rounded up to `multiple`."""
    if tokens.size == 0:
        return min(multiple, context_length)
    last = int(np.max(np.argmax(tokens, axis=-1))) + 1
    return min(context_length, -(-last // multiple) * multiple)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _encode(graphdef, state, inputs, tower: str, normalize: bool):
    model = nnx.merge(graphdef, state)
    if tower == "image":
        return model.image_features(inputs, normalize)
    return model.text_features(inputs, normalize)


def build_model(config: CLIPConfig, *, seed: int = 0, dtype=jnp.float32, remat: bool | str = False,
                attention: str = AUTO) -> CLIP:
    """A randomly initialised model, filled on the host with numpy (deterministic for a seed).

    Eager JAX initialisation would compile one random kernel per parameter shape; sampling the
    same distributions with numpy compiles nothing (benchmarks/README.md, "Model initialisation").
    """
    model = abstract_model(config, dtype=dtype, remat=remat, attention=attention)
    values = sample_params(config, seed=seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        var.value = jnp.asarray(values[tuple(path)])
    return model


def sample_params(config: CLIPConfig, *, seed: int = 0) -> dict[tuple, np.ndarray]:
    """`build_model`'s random parameters as host numpy arrays, never placed on a device.

    Training places them shard by shard (`train.state.initial_state`), so no device and
    no process ever holds more than its own shard of a fresh model.
    """
    rng = np.random.default_rng(seed)
    return {tuple(path): np.asarray(var.get_metadata("init").sample(rng, tuple(var.value.shape)))
            for path, var in nnx.to_flat_state(nnx.state(abstract_model(config), nnx.Param))}


def _scalar_param(value: float) -> nnx.Param:
    init = Init(constant=float(value))
    return nnx.Param(jnp.asarray(value, jnp.float32), init=init)


def abstract_model(config: CLIPConfig, *, dtype=jnp.float32, remat: bool | str = False,
                   scan_layers: bool = False, attention: str = AUTO, replay_projector: bool = False) -> CLIP:
    """Shapes only: nothing is allocated, so models larger than one device can be planned.

    `remat` (none, full or a `jax.checkpoint_policies` name; True/False mean full/none) and
    `attention` (auto, xla, cudnn, head_major) change how the model computes, never its numbers.
    `replay_projector` adds BioCLIP 2's second visual projection (training with replay only).
    """
    return nnx.eval_shape(lambda: CLIP(config, dtype=dtype, remat=remat, scan_layers=scan_layers,
                                       attention=attention, replay_projector=replay_projector,
                                       rngs=nnx.Rngs(0)))
