"""Mesh construction and logical-axis sharding of parameters, the train state's optimiser state and batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bioclip_jax.parallel import (
    LOGICAL_RULES,
    batch_sharding,
    host_batch_to_global,
    logical_to_mesh_spec,
    make_mesh,
    state_shardings,
)
from bioclip_jax.train import state as state_lib
from train_helpers import smoke_config


def test_make_mesh_fills_the_rest_and_names_axes():
    assert jax.device_count() == 8, "tests/conftest.py must give 8 simulated CPU devices"
    assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(make_mesh(2, -1).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert dict(make_mesh(1, 4, -1).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert make_mesh(2, 2, devices=jax.devices()[:4]).devices.size == 4


@pytest.mark.parametrize(
    "sizes, message",
    [
        ((3, 1, 1), "= 3 devices, but 8 are available"),
        ((-1, 3, 1), "multiply to 3, which does not divide 8"),
        ((-1, -1, 1), "at most one axis"),
        ((0, 8, 1), "'data' has size 0"),
    ],
)
def test_make_mesh_rejects_sizes_that_do_not_fit(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(*sizes)


def test_logical_names_map_to_mesh_axes_and_drop_what_does_not_fit():
    mesh = make_mesh(2, 2, 2)
    assert logical_to_mesh_spec(("embed", "mlp"), LOGICAL_RULES, mesh, (8, 16)) == P("fsdp", "tensor")
    assert logical_to_mesh_spec(("batch", None), LOGICAL_RULES, mesh, (8, 3)) == P(("data", "fsdp"))
    # 2 rows divide over "data" only; 3 columns divide over nothing.
    assert logical_to_mesh_spec(("batch", "mlp"), LOGICAL_RULES, mesh, (2, 3)) == P("data")
    # A mesh axis is used at most once per array.
    assert logical_to_mesh_spec(("embed", "embed"), LOGICAL_RULES, mesh, (8, 8)) == P("fsdp")
    assert logical_to_mesh_spec(("position", "head_dim"), LOGICAL_RULES, mesh, (8, 8)) == P()
    # Axes of size 1 are left out; rules may be given as lists.
    list_rules = [["embed", ["fsdp", "tensor"]], ["mlp", "data"]]
    assert logical_to_mesh_spec(("embed", "mlp"), list_rules, make_mesh(2, 4), (8, 8)) == P("fsdp", "data")
    with pytest.raises(ValueError, match="'embd' has no sharding rule"):
        logical_to_mesh_spec(("embd",), LOGICAL_RULES, mesh, (8,))


class _ToyTower(nnx.Module):
    """Parameters annotated the way the project's models annotate theirs."""

    def __init__(self, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.02)
        self.token_embedding = nnx.Param(
            init(rngs.params(), (32, 8)), out_sharding=("vocab", "embed"), eager_sharding=False
        )
        self.fc = nnx.Param(init(rngs.params(), (8, 16)), out_sharding=("embed", "mlp"), eager_sharding=False)
        self.fc_bias = nnx.Param(jnp.zeros((16,)), out_sharding=("mlp",), eager_sharding=False)
        self.ln_final = nnx.LayerNorm(8, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(2.0), eager_sharding=False)


def _abstract_params():
    return nnx.eval_shape(lambda: nnx.state(_ToyTower(nnx.Rngs(0)), nnx.Param))


def _init_params():
    return nnx.state(_ToyTower(nnx.Rngs(0)), nnx.Param)


def test_state_shardings_follow_param_metadata():
    mesh = make_mesh(2, 2, 2)
    shardings = state_shardings(_abstract_params(), mesh)
    assert shardings["token_embedding"].value.spec == P("tensor", "fsdp")
    assert shardings["fc"].value.spec == P("fsdp", "tensor")
    assert shardings["fc_bias"].value.spec == P("tensor")
    assert shardings["ln_final"]["scale"].value.spec == P()
    assert shardings["logit_scale"].value.spec == P()

    params = jax.jit(_init_params, out_shardings=shardings)()
    assert params["fc"].value.sharding == shardings["fc"].value
    assert params["fc"].value.addressable_shards[0].data.shape == (4, 8)
    np.testing.assert_allclose(params["fc"].value, _init_params()["fc"].value, rtol=1e-6)


@pytest.mark.parametrize("accumulate_mode", ["global_negatives", "independent_microbatches"])
def test_optimizer_state_mirrors_parameter_shardings(accumulate_mode):
    """The train state's layout: Adam's moments (and MultiSteps' accumulated gradients) are sharded
    like their parameters, counters replicated; the optimiser initialises straight into it."""
    config = smoke_config("", optimizer__accumulate_mode=accumulate_mode, optimizer__accumulate_steps=2)
    mesh = make_mesh(2, 2, 2)
    layout = state_lib.state_layout(config, state_lib.model_skeleton(config), mesh)
    params = layout.shardings["params"]
    sharded = {name for name, sharding in params.items() if sharding.spec != P()}
    assert "visual.transformer.blocks.mlp.fc" in sharded

    copies: dict[str, int] = {}
    for path, sharding in jax.tree_util.tree_leaves_with_path(layout.shardings["opt_state"]):
        name = getattr(path[-1], "key", None)
        if name in params:
            assert sharding == params[name], jax.tree_util.keystr(path)
            copies[name] = copies.get(name, 0) + 1
        else:
            assert sharding.spec == P(), jax.tree_util.keystr(path)
    per_parameter = 3 if accumulate_mode == "independent_microbatches" else 2  # mu, nu (, acc_grads)
    assert {name: copies.get(name) for name in sharded} == {name: per_parameter for name in sharded}

    abstract = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), layout.abstract["params"])
    opt_state = jax.jit(layout.optimizer.init, out_shardings=layout.shardings["opt_state"])(abstract)
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if getattr(path[-1], "key", None) == "visual.transformer.blocks.mlp.fc"][0]
    assert mu.sharding == params["visual.transformer.blocks.mlp.fc"]


def test_host_batch_becomes_a_global_batch_sharded_array():
    mesh = make_mesh(2, 4)
    local = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "tokens": np.ones((16, 77), np.int32)}
    batch = host_batch_to_global(local, mesh)
    assert batch_sharding(mesh) == NamedSharding(mesh, P(("data", "fsdp")))
    assert batch["image"].shape == (16, 3) and batch["image"].sharding == batch_sharding(mesh)
    assert batch["image"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(batch["image"], local["image"])
    with pytest.raises(ValueError, match=r"\['image'\]: 12 rows per process"):
        host_batch_to_global({"image": np.zeros((12, 3))}, mesh)
