"""CLIP contrastive losses over the global batch, computed row-block by row-block.

Each device holds B/n rows of the batch. It all-gathers the (small, [B, D]) features of
the other devices, differentiably, and scores only its own rows against all columns:
a [B/n, B] block of logits, never the full [B, B] matrix. This is open_clip's
`local_loss=True, gather_with_grad=True` mode; summing the per-device losses and
dividing by B gives exactly the loss (and gradient) of the dense single-device formula.

Contract: features arrive unnormalised ([B, D], any float dtype); they are
L2-normalised here in float32. `logit_scale` is the *log* of the temperature
multiplier, as stored in open_clip's `model.logit_scale`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

LOSS_KINDS = ("softmax", "sigmoid")
MAX_LOG_LOGIT_SCALE = math.log(100.0)


def clamp_logit_scale(logit_scale: jax.Array) -> jax.Array:
    """The [0, ln 100] clamp that open_clip applies to the parameter after every optimiser step.

    Train steps should apply this to the stored parameter after each update. The loss
    applies it too, so a parameter that drifted out of range is never used as is; inside
    the range (including exactly ln 100, where CLIP-initialised models start) the
    gradient passes unchanged.
    """
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    logit_scale = jnp.where(logit_scale > MAX_LOG_LOGIT_SCALE, MAX_LOG_LOGIT_SCALE, logit_scale)
    return jnp.where(logit_scale < 0.0, 0.0, logit_scale)


def _l2_normalize(features: jax.Array) -> jax.Array:
    features = features.astype(jnp.float32)
    squared_norm = jnp.sum(features * features, axis=-1, keepdims=True)
    return features * jax.lax.rsqrt(jnp.maximum(squared_norm, 1e-24))


def _softmax_row_block(image_rows, text_rows, all_images, all_texts, scale, bias, row_offset):
    """Summed cross entropy of these rows in both directions, plus correct-match counts."""
    del bias
    labels = row_offset + jnp.arange(image_rows.shape[0])
    sums = {}
    for direction, rows, columns in (
        ("image_to_text", image_rows, all_texts),
        ("text_to_image", text_rows, all_images),
    ):
        logits = scale * (rows @ columns.T)
        positive = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
        sums[f"{direction}_loss"] = jnp.sum(jax.nn.logsumexp(logits, axis=1) - positive)
        sums[f"{direction}_correct"] = jnp.sum(jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
    return sums


def _sigmoid_row_block(image_rows, text_rows, all_images, all_texts, scale, bias, row_offset):
    """SigLIP: every (image row, text column) pair is a binary match / no-match problem."""
    del text_rows, all_images
    labels = row_offset + jnp.arange(image_rows.shape[0])
    logits = scale * (image_rows @ all_texts.T) + bias
    is_match = jnp.arange(all_texts.shape[0])[None, :] == labels[:, None]
    signs = jnp.where(is_match, 1.0, -1.0)
    return {
        "sigmoid_loss": -jnp.sum(jax.nn.log_sigmoid(signs * logits)),
        "image_to_text_correct": jnp.sum(jnp.argmax(logits, axis=1) == labels).astype(jnp.float32),
    }


_ROW_BLOCKS = {"softmax": _softmax_row_block, "sigmoid": _sigmoid_row_block}


def _finish(sums: dict, global_batch: int, scale, bias, kind: str) -> tuple[jax.Array, dict]:
    """Global sums -> mean loss and metrics (same arithmetic for the dense and sharded paths)."""
    if kind == "softmax":
        loss = (sums["image_to_text_loss"] + sums["text_to_image_loss"]) / (2 * global_batch)
    else:
        loss = sums["sigmoid_loss"] / global_batch
    metrics = {"loss": loss, "logit_scale": scale}
    for name, value in sums.items():
        if name.endswith("_correct"):
            metrics[name.replace("_correct", "_accuracy")] = value / global_batch
    if kind == "sigmoid":
        metrics["logit_bias"] = bias
    return loss, metrics


def _check_inputs(image_features, text_features, kind, logit_bias) -> None:
    if kind not in LOSS_KINDS:
        raise ValueError(f"contrastive loss kind {kind!r} is unknown; choose one of {LOSS_KINDS}.")
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise ValueError(
            f"image features {image_features.shape} and text features {text_features.shape} "
            "must both be [batch, dim] with the same shape."
        )
    if kind == "sigmoid" and logit_bias is None:
        raise ValueError("the sigmoid (SigLIP) loss needs a logit_bias.")


def _scale_and_bias(logit_scale, logit_bias):
    scale = jnp.exp(clamp_logit_scale(logit_scale))
    bias = jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
    return scale, bias


def dense_contrastive_loss(
    image_features: jax.Array,
    text_features: jax.Array,
    logit_scale: jax.Array,
    kind: str = "softmax",
    logit_bias: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Single-device reference: the whole [B, B] logit matrix at once. For tests and tiny runs."""
    _check_inputs(image_features, text_features, kind, logit_bias)
    images, texts = _l2_normalize(image_features), _l2_normalize(text_features)
    scale, bias = _scale_and_bias(logit_scale, logit_bias)
    sums = _ROW_BLOCKS[kind](images, texts, images, texts, scale, bias, 0)
    return _finish(sums, images.shape[0], scale, bias, kind)


def contrastive_loss(
    image_features: jax.Array,
    text_features: jax.Array,
    logit_scale: jax.Array,
    mesh: Mesh,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    kind: str = "softmax",
    logit_bias: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Mean contrastive loss over the global batch; each device scores only its own rows.

    `image_features` / `text_features` are global [B, D] arrays (sharded over
    `batch_axes`, or resharded to that on entry). Returns the loss and a metrics dict
    (loss, logit_scale, retrieval accuracies, logit_bias for SigLIP), all replicated.
    """
    _check_inputs(image_features, text_features, kind, logit_bias)
    axes = tuple(axis for axis in batch_axes if axis in mesh.shape)
    if not axes:
        return dense_contrastive_loss(image_features, text_features, logit_scale, kind, logit_bias)
    shards = int(np.prod([mesh.shape[axis] for axis in axes]))
    global_batch = image_features.shape[0]
    if global_batch % shards:
        raise ValueError(
            f"global batch {global_batch} does not split evenly over {shards} devices of mesh axes {axes}."
        )
    row_block = _ROW_BLOCKS[kind]

    def per_device(local_images, local_texts, log_scale, bias_param):
        images, texts = _l2_normalize(local_images), _l2_normalize(local_texts)
        scale, bias = _scale_and_bias(log_scale, bias_param)
        all_texts = jax.lax.all_gather(texts, axes, tiled=True)
        all_images = jax.lax.all_gather(images, axes, tiled=True) if kind == "softmax" else None
        row_offset = jax.lax.axis_index(axes) * images.shape[0]
        sums = row_block(images, texts, all_images, all_texts, scale, bias, row_offset)
        return _finish(jax.lax.psum(sums, axes), global_batch, scale, bias, kind)

    rows = PartitionSpec(axes)
    bias_param = jnp.zeros((), jnp.float32) if logit_bias is None else logit_bias
    sharded = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(rows, rows, PartitionSpec(), PartitionSpec()),
        out_specs=PartitionSpec(),
    )
    return sharded(image_features, text_features, logit_scale, bias_param)
