"""The train step: one pure function, jitted with explicit shardings and a donated state."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding

from bioclip_jax.data.replay import replay_enabled
from bioclip_jax.models.config import OPENAI_MEAN, OPENAI_STD
from bioclip_jax.parallel import sharding as sharding_lib
from bioclip_jax.train.accumulation import LOGIT_SCALE_KEY, accumulated_grads, head_params
from bioclip_jax.train.loss import MAX_LOG_LOGIT_SCALE, contrastive_loss
from bioclip_jax.train.optimizer import accumulation, batches_per_update, frozen_tower, is_frozen
from bioclip_jax.train.state import ModelSkeleton, StateLayout
from bioclip_jax.transforms import normalize


def make_grad_fn(config: ml_collections.ConfigDict, skeleton: ModelSkeleton, mesh: Mesh,
                 mean=OPENAI_MEAN, std=OPENAI_STD, param_shardings=None):
    """`grads(params, batch) -> ((loss, metrics), grads)` of the contrastive loss over the global batch.

    With experience replay (BioCLIP 2) the objective is the tree-of-life pairs' contrastive loss
    plus that of the replay pairs, whose images go through the second visual projector
    (`replay_proj`); each part has only its own negatives and they share the temperature.
    With `optimizer.accumulate_steps = k > 1` under "global_negatives" the batch (replay rows
    included) runs as k micro-batches with all its negatives (train/accumulation.py); the
    result is the same.
    """
    axes = sharding_lib.batch_axes(mesh)
    freeze = frozen_tower(config)
    replay = replay_enabled(config)

    def model_of(params):
        """The model, with a frozen tower's parameters held constant: XLA then drops its backward pass."""
        return skeleton.merge({key: jax.lax.stop_gradient(value) if is_frozen(key, freeze) else value
                               for key, value in params.items()})

    def features(params, batch) -> dict:
        model = model_of(params)
        with sharding_lib.pinned_activations(mesh):
            out = {"image": model.image_features(normalize(batch["image"], mean, std)),
                   "text": model.text_features(batch["tokens"])}
            if replay:
                out["replay_image"] = model.image_features(normalize(batch["replay_image"], mean, std),
                                                           projector="replay_proj")
                out["replay_text"] = model.text_features(batch["replay_tokens"])
        return out

    def pair_loss(image_features, text_features, head):
        return contrastive_loss(image_features, text_features, head[LOGIT_SCALE_KEY], mesh, batch_axes=axes,
                                kind=config.loss.kind, logit_bias=head.get("logit_bias"))

    def loss(feats: dict, head: dict):
        main, metrics = pair_loss(feats["image"], feats["text"], head)
        if not replay:
            return main, metrics
        replayed, _ = pair_loss(feats["replay_image"], feats["replay_text"], head)
        return main + replayed, dict(metrics, loss_tree_of_life=main, loss_replay=replayed)

    k, mode = accumulation(config)
    if k > 1 and mode == "global_negatives":
        return accumulated_grads(features, loss, mesh, axes, k, param_shardings)
    return jax.value_and_grad(lambda params, batch: loss(features(params, batch), head_params(params)),
                              has_aux=True)


def make_train_step(config: ml_collections.ConfigDict, skeleton: ModelSkeleton, layout: StateLayout,
                    mesh: Mesh, schedule: Callable[[jax.Array], jax.Array],
                    mean=OPENAI_MEAN, std=OPENAI_STD):
    """Returns jitted `step(state, batch) -> (state, metrics)`: one call, one batch, one update
    (except under accumulate_mode="independent_microbatches", where k calls make one).

    `batch` holds global arrays: "image" uint8 [B, S, S, 3] (normalised here, on the
    device: 4x less host-to-device traffic than float32) and "tokens" int32 [B, 77].
    """
    grad_fn = make_grad_fn(config, skeleton, mesh, mean, std, layout.shardings["params"])
    calls_per_update = batches_per_update(config)

    def step(state, batch):
        (loss, metrics), grads = grad_fn(state["params"], batch)
        updates, opt_state = layout.optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # open_clip clamps the temperature parameter itself after every update.
        params[LOGIT_SCALE_KEY] = jnp.clip(params[LOGIT_SCALE_KEY], 0.0, MAX_LOG_LOGIT_SCALE)
        update = state["step"] // calls_per_update
        metrics = dict(metrics, loss=loss, lr=schedule(update), grad_norm=optax.global_norm(grads))
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

    data = sharding_lib.batch_sharding(mesh)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(layout.shardings, data), out_shardings=(layout.shardings, replicated),
                   donate_argnums=0)


def model_flops_per_pair(config, text_tokens: int | None = None) -> float:
    """Analytic training FLOPs for one image-text pair (forward + backward = 3x forward).

    Counts every matmul (2 FLOPs per multiply-add) including attention scores and
    values; ignores normalisation and softmax. ViT-B/16: ~123 GFLOP. `text_tokens`: the
    positions the text tower runs (`config.data.text_tokens`), default its full context.
    """
    def tower(tokens, width, layers, mlp):
        per_layer = 4 * tokens * width * width + 2 * tokens * tokens * width + 2 * tokens * width * mlp
        return layers * per_layer

    v, t = config.vision, config.text
    patches = v.grid * v.grid
    vision = tower(patches + 1, v.width, v.layers, v.mlp_width) + patches * v.patch_size ** 2 * 3 * v.width \
        + v.width * config.embed_dim
    text = tower(text_tokens or t.context_length, t.width, t.layers, t.mlp_width) + t.width * config.embed_dim
    return 3 * 2 * float(vision + text)


def pairs_per_step(config) -> int:
    """Image-text pairs one step trains on: the batch plus BioCLIP 2's replay pairs, which go
    through both towers too (their projector is the size of the main one): each costs
    `model_flops_per_pair`, and each counts in images per second and MFU."""
    return int(config.data.batch_size) + (int(config.data.replay_per_batch) if replay_enabled(config) else 0)


# bf16 dense peak TFLOP/s per device, by `jax.devices()[0].device_kind`, for MFU; unknown kinds
# (CPUs) get no MFU. TPUs report one exact kind per generation: v5e and v6e as "lite", v5p as
# plain "TPU v5". NVIDIA kinds add form factor and memory to the model ("NVIDIA H100 80GB HBM3",
# "NVIDIA A100-SXM4-40GB"), so their entries also match as the longest leading name.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v6 lite": 918.0,
    "NVIDIA A100": 312.0,
    "NVIDIA H100": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0,
    "NVIDIA B200": 2250.0,
}
_FAMILY_PREFIX = "NVIDIA "


def peak_tflops_of(kind: str) -> float:
    """The table's peak for a device kind: its exact entry, else (NVIDIA) the longest entry that
    starts it and ends at a word boundary; NaN when none does."""
    if kind in PEAK_TFLOPS:
        return PEAK_TFLOPS[kind]
    families = [name for name in PEAK_TFLOPS if name.startswith(_FAMILY_PREFIX) and kind.startswith(name)
                and not kind[len(name)].isalnum()]
    return PEAK_TFLOPS[max(families, key=len)] if families else math.nan


def device_peak_tflops(configured: float = 0.0) -> float:
    """`configured` when set, else the first device's peak from `PEAK_TFLOPS` (NaN: no MFU)."""
    if configured:
        return configured
    return peak_tflops_of(jax.devices()[0].device_kind)
