"""The two CLIP towers: a ViT image encoder and a causal text transformer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bioclip_jax.models.attention import AUTO
from bioclip_jax.models.config import TextConfig, VisionConfig
from bioclip_jax.models.layers import TOKENS, LayerNorm, Transformer, exact_gelu, logical_param, normal, quick_gelu
from bioclip_jax.parallel.sharding import constrain


def _activation(use_quick_gelu: bool):
    return quick_gelu if use_quick_gelu else exact_gelu


class VisionTransformer(nnx.Module):
    """ViT: patch embedding, class token, learned positions, ln_pre, blocks, ln_post, projection.

    Takes normalised float images [B, H, W, 3] (channels last) and returns the
    projected class-token embedding [B, embed_dim]. With `replay_projector` it also has
    BioCLIP 2's second projection (`replay_proj`), used for general-domain replay images.
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int, *, quick_gelu: bool = False,
                 dtype=jnp.float32, remat: bool | str = False, scan_layers: bool = False,
                 attention: str = AUTO, replay_projector: bool = False, rngs: nnx.Rngs):
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.cfg = cfg
        self.dtype = dtype
        w = cfg.width
        scale = w ** -0.5
        patch_in = cfg.patch_size * cfg.patch_size * 3
        # Patch kernel rows are ordered (patch row, patch column, channel).
        self.patch_embed = logical_param(rngs, normal(patch_in ** -0.5), (patch_in, w),
                                         ("patch_in", "embed"))
        self.class_embedding = logical_param(rngs, normal(scale), (w,), ("embed",))
        self.positional_embedding = logical_param(
            rngs, normal(scale), (cfg.grid * cfg.grid + 1, w), ("position", "embed"))
        self.ln_pre = LayerNorm(w, rngs=rngs)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_width, _activation(quick_gelu),
                                       remat=remat, scan=scan_layers, attention_kernel=attention, rngs=rngs)
        self.ln_post = LayerNorm(w, rngs=rngs)
        self.proj = logical_param(rngs, normal(scale), (w, embed_dim), ("embed", "proj_out"))
        if replay_projector:
            self.replay_proj = logical_param(rngs, normal(scale), (w, embed_dim), ("embed", "proj_out"))

    def patchify(self, images: jax.Array) -> jax.Array:
        b, h, w, c = images.shape
        p, size = self.cfg.patch_size, self.cfg.image_size
        if (h, w, c) != (size, size, 3):
            raise ValueError(f"expected images of shape [B, {size}, {size}, 3], got {list(images.shape)}")
        g = size // p
        x = images.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * g, p * p * c)

    def __call__(self, images: jax.Array, projector: str = "proj") -> jax.Array:
        """`projector` "proj" (the model's own) or "replay_proj" (replay images in training)."""
        return self.pooled(images) @ getattr(self, projector)[...].astype(self.dtype)

    def pooled(self, images: jax.Array) -> jax.Array:
        """The class token after ln_post, before any projection: [B, width]."""
        dtype = self.dtype
        x = self.patchify(images.astype(dtype)) @ self.patch_embed[...].astype(dtype)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(dtype)
        x = self.ln_pre(constrain(x, TOKENS))
        x = self.transformer(x)
        return self.ln_post(x[:, 0])


class TextTransformer(nnx.Module):
    """Causal text transformer pooled at the end-of-text token (the largest token id)."""

    def __init__(self, cfg: TextConfig, embed_dim: int, *, quick_gelu: bool = False,
                 dtype=jnp.float32, remat: bool | str = False, scan_layers: bool = False,
                 attention: str = AUTO, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        w = cfg.width
        self.token_embedding = logical_param(rngs, normal(0.02), (cfg.vocab_size, w),
                                             ("vocab", "embed"))
        self.positional_embedding = logical_param(rngs, normal(0.01),
                                                  (cfg.context_length, w), ("position", "embed"))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_width, _activation(quick_gelu),
                                       remat=remat, scan=scan_layers, attention_kernel=attention, rngs=rngs)
        self.ln_final = LayerNorm(w, rngs=rngs)
        self.text_projection = logical_param(rngs, normal(w ** -0.5), (w, embed_dim),
                                             ("embed", "proj_out"))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        dtype = self.dtype
        b, length = tokens.shape
        if not 1 <= length <= self.cfg.context_length:
            raise ValueError(f"expected tokens of shape [B, L] with L <= {self.cfg.context_length}, "
                             f"got {list(tokens.shape)}")
        # Shorter rows are exact, not an approximation: with a causal mask no position sees
        # the padding after it, and pooling reads the end-of-text position.
        # The table is gathered whole (over fsdp) for the lookup, so the looked-up rows and their
        # gradient stay batch-sharded; split by the table's width instead, XLA reshards them
        # through a full replica of the batch's activations.
        table = constrain(self.token_embedding[...], ("vocab", None))
        x = jnp.take(table, tokens, axis=0).astype(dtype)
        x = constrain(x + self.positional_embedding[:length].astype(dtype), TOKENS)
        x = self.transformer(x, causal=True)
        x = self.ln_final(x)
        pooled = jnp.take_along_axis(x, jnp.argmax(tokens, axis=-1)[:, None, None], axis=1)[:, 0]
        return pooled @ self.text_projection[...].astype(dtype)
