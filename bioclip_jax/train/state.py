"""The train state as plain pytrees, its shardings, and how it is created.

Parameters travel as a flat dict {"visual.transformer.blocks.attn.query": array}:
the same keys as a bioclip_jax model directory, so a training checkpoint's `params`
item is directly a loadable model, and optax/Orbax/sharding all see a simple dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bioclip_jax.checkpoint.model_dir import path_to_key
from bioclip_jax.data.replay import replay_enabled
from bioclip_jax.models import attention, remat
from bioclip_jax.models.clip import CLIP, abstract_model
from bioclip_jax.models.config import CLIPConfig, get_model_config
from bioclip_jax.parallel import sharding as sharding_lib
from bioclip_jax.train.optimizer import batches_per_update, make_optimizer

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def state_to_flat(state: nnx.State) -> dict[str, Any]:
    return {path_to_key(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def flat_to_state(template: nnx.State, flat: dict[str, Any]) -> nnx.State:
    """Rebuilds an NNX State shaped like `template` from flat values (works under tracing)."""
    return nnx.from_flat_state([(path, var.replace(flat[path_to_key(path)]))
                                for path, var in nnx.to_flat_state(template)])


@dataclasses.dataclass(frozen=True)
class ModelSkeleton:
    """Everything about the model except parameter values: rebuilds a model from params."""

    graphdef: Any
    template: nnx.State  # abstract Param state (shapes, logical axes)
    rest: nnx.State      # non-parameter state (empty for CLIP, kept for completeness)

    def merge(self, params: dict[str, Any]) -> CLIP:
        return nnx.merge(self.graphdef, flat_to_state(self.template, params), self.rest)


SIGLIP_INIT_LOGIT_BIAS = -10.0


def train_architecture(config: ml_collections.ConfigDict) -> CLIPConfig:
    """The named architecture, plus a learned logit bias when training with the sigmoid loss."""
    arch = get_model_config(config.model.name)
    if config.loss.kind == "sigmoid" and arch.init_logit_bias is None:
        arch = dataclasses.replace(arch, init_logit_bias=SIGLIP_INIT_LOGIT_BIAS)
    return arch


def model_skeleton(config: ml_collections.ConfigDict) -> ModelSkeleton:
    """The model the train step compiles, for JAX's default backend."""
    if config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.dtype={config.dtype!r}; choose one of {sorted(COMPUTE_DTYPES)}")
    attention.require_runnable(attention.check(config.attention, "config.attention"), field="config.attention")
    model = abstract_model(train_architecture(config), dtype=COMPUTE_DTYPES[config.dtype],
                           remat=remat.check(config.remat, "config.remat"), scan_layers=bool(config.scan_layers),
                           attention=attention.check(config.attention, "config.attention"),
                           replay_projector=replay_enabled(config))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return ModelSkeleton(graphdef, params, rest)


def param_shardings(skeleton: ModelSkeleton, mesh: Mesh) -> dict[str, NamedSharding]:
    return state_to_flat(sharding_lib.state_shardings(skeleton.template, mesh))


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Abstract train state (ShapeDtypeStructs) and matching shardings, from `jax.eval_shape`."""

    abstract: dict
    shardings: dict
    optimizer: optax.GradientTransformation


def optimizer_updates(config: ml_collections.ConfigDict) -> int:
    """Schedule length in optimiser updates: `total_steps` counts train-step calls, and under
    accumulate_mode="independent_microbatches" every `accumulate_steps` calls make one update."""
    return max(1, config.total_steps // batches_per_update(config))


def state_layout(config: ml_collections.ConfigDict, skeleton: ModelSkeleton, mesh: Mesh) -> StateLayout:
    optimizer = make_optimizer(config, optimizer_updates(config))
    abstract_params = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                       for k, v in state_to_flat(skeleton.template).items()}
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    p_shardings = param_shardings(skeleton, mesh)
    abstract = {"params": abstract_params, "opt_state": abstract_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = {"params": p_shardings,
                 "opt_state": optimizer_state_shardings(abstract_opt, abstract_params, p_shardings, mesh),
                 "step": NamedSharding(mesh, PartitionSpec())}
    return StateLayout(abstract, shardings, optimizer)


def optimizer_state_shardings(abstract_opt: Any, abstract_params: dict, p_shardings: dict[str, NamedSharding],
                              mesh: Mesh) -> Any:
    """Optimiser leaves that mirror a parameter (Adam mu/nu, MultiSteps' accumulated gradients) get
    its sharding; the rest (step counts, scalars) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        for key in reversed(path):
            name = getattr(key, "key", None)
            if isinstance(name, str) and name in abstract_params:
                if tuple(abstract_params[name].shape) == tuple(leaf.shape):
                    return p_shardings[name]
                break
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def place_host_params(params: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, jax.Array]:
    """Global float32 arrays from host parameters that every process holds in full.

    Each process copies only the shards of its own devices (`make_array_from_callback`):
    no device ever holds a whole sharded parameter, and unlike `device_put` of a full
    array onto a global sharding there is no cross-process equality check (an allgather
    of every parameter to every process).
    """
    def place(key: str) -> jax.Array:
        host = np.asarray(params[key], np.float32)
        return jax.make_array_from_callback(host.shape, shardings[key], lambda index: host[index])

    return {key: place(key) for key in params}


def initial_state(layout: StateLayout, params: dict[str, np.ndarray]) -> dict:
    """Places host parameters onto the mesh and initialises the optimiser there (sharded)."""
    placed = place_host_params(params, layout.shardings["params"])

    def init(p):
        return {"params": p, "opt_state": layout.optimizer.init(p), "step": jnp.zeros((), jnp.int32)}

    return jax.jit(init, out_shardings=layout.shardings)(placed)
