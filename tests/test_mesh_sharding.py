"""Mesh construction and logical-axis sharding of parameters, optimiser state and batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    optimizer_state_shardings,
    state_shardings,
)


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
    # Axes of size 1 are left out; rules read from a config may be lists.
    config_rules = [["embed", ["fsdp", "tensor"]], ["mlp", "data"]]
    assert logical_to_mesh_spec(("embed", "mlp"), config_rules, make_mesh(2, 4), (8, 8)) == P("fsdp", "data")
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


def test_optimizer_state_mirrors_parameter_shardings():
    mesh = make_mesh(2, 2, 2)
    abstract_params = _abstract_params()
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), every_k_schedule=2)
    abstract_state = jax.eval_shape(tx.init, abstract_params)
    shardings = optimizer_state_shardings(abstract_state, abstract_params, mesh)

    adam = shardings.inner_opt_state[1][0]
    fc_spec = P("fsdp", "tensor")
    for tree in (adam.mu, adam.nu, shardings.acc_grads):
        assert tree["fc"].value.spec == fc_spec
        assert tree["token_embedding"].value.spec == P("tensor", "fsdp")
        assert tree["logit_scale"].value.spec == P()
    assert adam.count.spec == P() and shardings.mini_step.spec == P()
    sharded_leaves = [s for s in jax.tree.leaves(shardings) if s.spec != P()]
    assert len(sharded_leaves) == 3 * 3  # fc, fc_bias, token_embedding in mu, nu, acc_grads

    params = jax.jit(_init_params, out_shardings=state_shardings(abstract_params, mesh))()
    opt_state = jax.jit(tx.init, out_shardings=shardings)(params)
    assert opt_state.acc_grads["fc"].value.sharding.spec == fc_spec


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
