"""Contrastive gradient accumulation with global negatives (open_clip's `accum_freq`, GradCache).

A contrastive loss couples every row of the batch with every other one, so averaging the
gradients of k separate micro-batches (optax MultiSteps) optimises another objective:
each micro-batch sees only its own B/k - 1 negatives. Here the step receives the whole
global batch of B rows and runs it as k micro-batches, which only bounds the activation
memory; the gradient is that of the full-batch loss L(F), F = features of all B rows:

1. Features of all k micro-batches, forward only (`lax.map`), kept: [B, D] each side.
2. For each micro-batch j (`lax.scan`): recompute f_j = towers(theta, x_j) with
   gradients, put it in place of its cached copy (the others are constants) and
   differentiate the loss of the WHOLE batch. That gives (dL/df_j) (df_j/dtheta); since
   theta reaches L only through the f_j, the sum over j is exactly dL/dtheta.
3. logit_scale and logit_bias reach L directly, not through any f_j: in step 2 they are
   held constant (else they would be counted k times) and their gradient is taken once,
   on the cached features, together with the logged loss and metrics.

Costs one extra forward pass of the towers (step 1) and k evaluations of the loss
([B/n, B] logits per device, as in the full step); the activations are those of one
micro-batch plus the cached features and one gradient accumulator. XLA reduces each
micro-batch's gradient over the devices inside the loop (k all-reduces, or fsdp
reduce-scatters, per update), as open_clip's DDP does after each backward.

Rows: device d of the n batch shards holds rows [d B/n, (d+1) B/n). Micro-batch j takes,
on every device, the j-th contiguous block of B/(n k) of its own rows, so each
micro-batch is spread over all devices like the full batch and neither splitting the
batch nor joining the features back into batch order moves data between devices. The
loss is computed on features in the original row order, so it equals the full step's.

Several streams: the features are a dict of [rows, D] arrays, and every array of the batch
is split the same way. BioCLIP 2's replay pairs (their own rows, their own projector, their
own loss term) are cached and recomputed beside the main pairs, micro-batch j holding the
j-th block of each stream, so the replay term too is that of the whole batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGIT_SCALE_KEY = "logit_scale"
HEAD_KEYS = (LOGIT_SCALE_KEY, "logit_bias")  # parameters the loss uses directly, not through the towers

FeaturesFn = Callable[[dict, dict], dict]  # (params, batch) -> features by name, each [rows, D]
LossFn = Callable[[dict, dict], tuple[jax.Array, dict]]  # (features, head) -> loss, metrics


def head_params(params: dict) -> dict:
    return {key: params[key] for key in HEAD_KEYS if key in params}


def split_microbatches(x: jax.Array, k: int, shards: int) -> jax.Array:
    """[B, ...] -> [k, B/k, ...]: micro-batch j holds the j-th block of each device's own rows."""
    rows = x.shape[0] // (shards * k)
    x = x.reshape(shards, k, rows, *x.shape[1:]).swapaxes(0, 1)
    return x.reshape(k, shards * rows, *x.shape[3:])


def join_microbatches(x: jax.Array, shards: int) -> jax.Array:
    """Inverse of `split_microbatches`: [k, B/k, ...] -> [B, ...] in the original row order."""
    k, rows = x.shape[0], x.shape[1] // shards
    x = x.reshape(k, shards, rows, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(shards * k * rows, *x.shape[3:])


def accumulated_grads(features_fn: FeaturesFn, loss_fn: LossFn, mesh: Mesh, batch_axes: Sequence[str], k: int,
                      param_shardings=None) -> Callable[[dict, dict], tuple[tuple[jax.Array, dict], dict]]:
    """`grads(params, batch) -> ((loss, metrics), grads)` of the full-batch loss, k micro-batches at a time.

    Same contract as `jax.value_and_grad(full_loss, has_aux=True)`; `param_shardings`
    (optional) pins the gradient accumulator to the parameters' layout.
    """
    axes = tuple(batch_axes)
    shards = math.prod(mesh.shape[a] for a in axes)
    on_rows = NamedSharding(mesh, PartitionSpec(axes or None))
    on_micro_rows = NamedSharding(mesh, PartitionSpec(None, axes or None))

    def split(x):
        return jax.lax.with_sharding_constraint(split_microbatches(x, k, shards), on_micro_rows)

    def join(x):
        return jax.lax.with_sharding_constraint(join_microbatches(x, shards), on_rows)

    def grads(params: dict, batch: dict):
        for name, x in batch.items():
            if x.shape[0] % (k * shards):
                raise ValueError(f"the {x.shape[0]} rows of batch[{name!r}] do not split into "
                                 f"optimizer.accumulate_steps={k} micro-batches over {shards} batch shards; "
                                 f"make them a multiple of {k * shards}.")
        micro = jax.tree.map(split, batch)
        cached = jax.lax.map(lambda mb: features_fn(params, mb), micro)  # 1. forward only
        cached = jax.lax.stop_gradient(jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, on_micro_rows),
                                                    cached))

        def micro_loss(p, mb, j):
            fresh = features_fn(p, mb)
            features = jax.tree.map(lambda c, f: join(jax.lax.dynamic_update_index_in_dim(c, f, j, 0)), cached, fresh)
            return loss_fn(features, jax.lax.stop_gradient(head_params(p)))[0]

        def accumulate(total, xs):  # 2. one micro-batch with gradients against all cached features
            j, mb = xs
            return jax.tree.map(jnp.add, total, jax.grad(micro_loss)(params, mb, j)), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        if param_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        tower_grads, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
        features = jax.tree.map(join, cached)  # 3. the head's gradient, once
        (loss, metrics), head_grads = jax.value_and_grad(lambda head: loss_fn(features, head), has_aux=True)(
            head_params(params))
        return (loss, metrics), {**tower_grads, **head_grads}

    return grads
