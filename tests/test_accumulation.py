"""Accumulation with global negatives: k micro-batches give the update of one step on the whole batch.

One train step on a random batch of 32 (fp32, 8 simulated devices) against the same
step with optimizer.accumulate_steps=4 (micro-batches of 8): the loss, the gradients
(Adam's first and second moments after one update are 0.1 g and 0.02 g^2) and the
parameters agree. Optax MultiSteps over 4 calls of 8 rows (each with its own negatives)
is shown to give another update, so the comparison can fail. The same holds with BioCLIP 2's
replay pairs in the batch: their loss, through the replay projector, is accumulated too.
"""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from bioclip_jax.parallel.mesh import make_mesh
from bioclip_jax.parallel.sharding import batch_axes, host_batch_to_global
from bioclip_jax.train import state as state_lib
from bioclip_jax.train.accumulation import accumulated_grads, join_microbatches, split_microbatches
from bioclip_jax.train.loop import initial_params
from bioclip_jax.train.optimizer import make_schedule
from bioclip_jax.train.step import make_train_step
from tests.train_helpers import smoke_config

BATCH, K, TOKENS = 32, 4, 48
REPLAY = 32  # replay rows beside the batch: K micro-batches of one row per simulated device
MESHES = {"data=8": dict(data=8), "data=2,fsdp=4": dict(data=2, fsdp=4)}
EOT = 49407


def _batch(rows: int = BATCH, seed: int = 0, replay: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, EOT - 1, (rows, TOKENS), dtype=np.int32)
    tokens[:, 0] = EOT - 1
    ends = rng.integers(2, TOKENS, rows)
    tokens[np.arange(rows), ends] = EOT
    tokens[np.arange(TOKENS)[None, :] > ends[:, None]] = 0
    batch = {"image": rng.integers(0, 256, (rows, 64, 64, 3), dtype=np.uint8), "tokens": tokens}
    if replay:
        other = _batch(replay, seed + 1)
        batch["replay_image"], batch["replay_tokens"] = other["image"], other["tokens"]
    return batch


@functools.cache
def _after_one_update(mesh_name: str, kind: str, k: int = 1, mode: str = "global_negatives", replay: int = 0):
    """(state, metrics) on the host after one optimiser update on `_batch()` from the same initial state."""
    calls = k if mode == "independent_microbatches" else 1
    config = smoke_config("", total_steps=24, loss__kind=kind, data__batch_size=BATCH // calls,
                          optimizer__accumulate_steps=k, optimizer__accumulate_mode=mode,
                          data__replay_per_batch=replay)
    mesh = make_mesh(**MESHES[mesh_name])
    skeleton = state_lib.model_skeleton(config)
    layout = state_lib.state_layout(config, skeleton, mesh)
    state = state_lib.initial_state(layout, initial_params(config)[0])
    step = make_train_step(config, skeleton, layout, mesh, make_schedule(config, state_lib.optimizer_updates(config)))
    micro = jax.tree.map(lambda x: split_microbatches(x, calls, 8), _batch(replay=replay))
    for j in range(calls):
        state, metrics = step(state, host_batch_to_global(jax.tree.map(lambda x: x[j], micro), mesh))
    return jax.device_get(state), jax.device_get(metrics)


def _leaves(tree) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("kind, mesh_name, replay", [
    ("softmax", "data=8", 0), ("softmax", "data=2,fsdp=4", 0), ("softmax", "data=2,fsdp=4", REPLAY),
    pytest.param("sigmoid", "data=8", 0, marks=pytest.mark.slow),  # softmax: fast version
    pytest.param("sigmoid", "data=2,fsdp=4", 0, marks=pytest.mark.slow),
])
def test_accumulated_update_equals_the_full_batch_update(mesh_name, kind, replay):
    full_state, full = _after_one_update(mesh_name, kind, replay=replay)
    state, metrics = _after_one_update(mesh_name, kind, K, replay=replay)

    assert int(state["step"]) == int(full_state["step"]) == 1  # one call, one update
    logged = ("loss_tree_of_life", "loss_replay") if replay else ()
    assert all(name in full for name in logged)
    for name in ("loss", "grad_norm", "lr", "image_to_text_accuracy", *logged):
        np.testing.assert_allclose(metrics[name], full[name], rtol=1e-5, atol=1e-6, err_msg=name)
    params = _leaves(state["params"])
    for name, want in _leaves(full_state["params"]).items():
        np.testing.assert_allclose(params[name], want, atol=1e-5, rtol=0, err_msg=name)
    # Adam's moments hold the gradient itself: 0.1 g and 0.02 g^2 after the first update. Scaled by
    # the largest entry of that moment, so that gradients that are 0 up to round-off (key biases) pass.
    got, want = _leaves(state["opt_state"]), _leaves(full_state["opt_state"])
    largest = {moment: max(np.abs(v).max() for n, v in want.items() if moment in n) for moment in (".mu", ".nu")}
    for name, value in want.items():
        scale = next((largest[m] for m in largest if m in name), 1.0)
        np.testing.assert_allclose(got[name] / scale, value / scale, atol=1e-5, rtol=0, err_msg=name)
    # Among them the temperature's (and SigLIP's bias's): counted once, not K times.
    head = [name for name in want if ".mu" in name and ("logit_scale" in name or "logit_bias" in name)]
    assert len(head) == (2 if kind == "sigmoid" else 1)


def test_independent_microbatches_give_another_update():
    full_state, full = _after_one_update("data=8", "softmax")
    state, metrics = _after_one_update("data=8", "softmax", K, "independent_microbatches")

    assert int(state["step"]) == K  # MultiSteps: K calls of BATCH / K rows made the one update
    assert abs(float(metrics["loss"]) - float(full["loss"])) > 1e-3  # only BATCH / K - 1 negatives each
    full_params = _leaves(full_state["params"])
    differences = [np.abs(got - full_params[name]).max() for name, got in _leaves(state["params"]).items()]
    assert max(differences) > 1e-4


def test_microbatch_split_moves_no_rows_between_devices():
    mesh = make_mesh(data=2, fsdp=4)
    axes = batch_axes(mesh)
    rows = np.arange(BATCH)
    micro = split_microbatches(rows, K, 8)
    np.testing.assert_array_equal(micro[1][:2], [1, 5])  # device 0 holds rows 0-3: one row per micro-batch
    np.testing.assert_array_equal(join_microbatches(micro, 8), rows)

    split = jax.jit(lambda x: split_microbatches(x, K, 8), in_shardings=NamedSharding(mesh, PartitionSpec(axes)),
                    out_shardings=NamedSharding(mesh, PartitionSpec(None, axes)))
    hlo = split.lower(jax.ShapeDtypeStruct((BATCH, 3), np.float32)).compile().as_text()
    assert not any(op in hlo for op in ("all-to-all", "collective-permute", "all-gather")), hlo


def test_replay_rows_that_do_not_split_into_micro_batches_are_named():
    mesh = make_mesh(data=8)
    grads = accumulated_grads(lambda params, batch: {}, lambda features, head: (0.0, {}), mesh, batch_axes(mesh), K)
    batch = {"image": np.zeros((BATCH, 1)), "replay_image": np.zeros((8, 1))}  # 32 rows split; 8 do not
    with pytest.raises(ValueError, match=r"the 8 rows of batch\['replay_image'\] do not split into "
                                         r"optimizer.accumulate_steps=4 micro-batches over 8 batch shards; "
                                         r"make them a multiple of 32"):
        grads({}, batch)
