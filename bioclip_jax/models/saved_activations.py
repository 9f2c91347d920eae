"""How many bytes a tower's training gradient keeps for its backward pass, per example.

Read from the traced program (no compilation, no device memory), so a CPU machine can size
an accelerator's batch and check the activation budget of each layer choice: the residuals
JAX saves between the forward and the backward pass at two batch sizes, differenced, so
that what does not grow with the batch (weights, their compute-dtype copies) drops out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax._src import ad_checkpoint  # saved_residuals: the public module only prints them

from bioclip_jax.models.clip import abstract_model
from bioclip_jax.models.config import CLIPConfig

TOWERS = ("image", "text")


def tower_loss(model, tower: str):
    """(loss(params, inputs), params): the sum of squares of one tower's features."""
    if tower not in TOWERS:
        raise ValueError(f"tower={tower!r}; choose one of {', '.join(TOWERS)}")
    graphdef, params = nnx.split(model)

    def loss(p, inputs):
        merged = nnx.merge(graphdef, p)
        features = merged.image_features(inputs) if tower == "image" else merged.text_features(inputs)
        return jnp.sum(features.astype(jnp.float32) ** 2)

    return loss, params


def tower_inputs(arch: CLIPConfig, tower: str, batch: int) -> jax.ShapeDtypeStruct:
    size = arch.vision.image_size
    if tower == "image":
        return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.ShapeDtypeStruct((batch, arch.text.context_length), jnp.int32)


def saved_bytes(loss, params, inputs) -> int:
    """Bytes of every residual the gradient of `loss` keeps, except its arguments."""
    return sum(aval.size * aval.dtype.itemsize for aval, source in ad_checkpoint.saved_residuals(loss, params, inputs)
               if "from the argument" not in source)


def saved_bytes_per_pair(arch: CLIPConfig, tower: str, *, dtype=jnp.bfloat16, remat: str = "none",
                         attention: str = "xla", scan_layers: bool = True) -> float:
    """Bytes kept per example by `tower`'s gradient (batch 4 minus batch 2, halved)."""
    model = abstract_model(arch, dtype=dtype, attention=attention, remat=remat, scan_layers=scan_layers)
    loss, params = tower_loss(model, tower)
    return (saved_bytes(loss, params, tower_inputs(arch, tower, 4))
            - saved_bytes(loss, params, tower_inputs(arch, tower, 2))) / 2
