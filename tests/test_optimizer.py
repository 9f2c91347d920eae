"""AdamW, weight-decay mask, schedules and accumulation against open_clip and hand-written numpy."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx
from open_clip_train import scheduler as open_clip_scheduler

from bioclip_jax.checkpoint.model_dir import path_to_key
from bioclip_jax.convert import names
from bioclip_jax.models.clip import abstract_model
from bioclip_jax.models.config import get_model_config
from bioclip_jax.models.params import param_shapes
from bioclip_jax.train.optimizer import key_path_names, make_optimizer, make_schedule, weight_decay_mask

TOTAL_STEPS, WARMUP, LR = 50, 10, 1e-3


def _config(schedule="cosine", warmup=WARMUP, **optimizer):
    fields = dict(name="adamw", lr=LR, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, grad_clip_norm=None)
    fields.update(accumulate_steps=1)
    fields.update(optimizer)
    return ml_collections.ConfigDict(
        {
            "optimizer": fields,
            "schedule": {"name": schedule, "warmup_steps": warmup, "cooldown_steps": 15, "cooldown_power": 2.0},
        }
    )


class _FakeTorchOptimizer:
    """Enough of a torch optimiser for open_clip's schedulers to write their lr into."""

    param_groups = [{}]


@pytest.mark.parametrize("name", ["cosine", "constant", "const-cooldown"])
def test_schedules_match_open_clip(name):
    fake = _FakeTorchOptimizer()
    reference = {
        "cosine": lambda: open_clip_scheduler.cosine_lr(fake, LR, WARMUP, TOTAL_STEPS),
        "constant": lambda: open_clip_scheduler.const_lr(fake, LR, WARMUP, TOTAL_STEPS),
        "const-cooldown": lambda: open_clip_scheduler.const_lr_cooldown(
            fake, LR, WARMUP, TOTAL_STEPS, cooldown_steps=15, cooldown_power=2.0
        ),
    }[name]()
    schedule = make_schedule(_config(name), TOTAL_STEPS)
    steps = np.arange(TOTAL_STEPS + 1)
    want = [reference(int(step)) for step in steps]
    np.testing.assert_allclose(jax.vmap(schedule)(steps), want, rtol=1e-5, atol=LR * 1e-6)


def test_cosine_schedule_formula_at_chosen_steps():
    schedule = make_schedule(_config("cosine"), TOTAL_STEPS)
    np.testing.assert_allclose(schedule(0), LR / WARMUP, rtol=1e-6)  # open_clip: lr * (step + 1) / warmup
    np.testing.assert_allclose(schedule(WARMUP - 1), LR, rtol=1e-6)
    np.testing.assert_allclose(schedule(WARMUP), LR, rtol=1e-6)
    middle = (WARMUP + TOTAL_STEPS) // 2
    np.testing.assert_allclose(schedule(middle), 0.5 * LR, rtol=1e-5)
    np.testing.assert_allclose(schedule(TOTAL_STEPS), 0.0, atol=1e-12)


class _ToyClip(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(4, 3, rngs=rngs)
        self.ln_final = nnx.LayerNorm(3, rngs=rngs)
        self.positional_embedding = nnx.Param(jax.random.normal(rngs.params(), (5, 3)))
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (3,)))
        self.ln_proj = nnx.Param(jax.random.normal(rngs.params(), (3, 3)))
        self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07)))


def _params():
    return nnx.state(_ToyClip(nnx.Rngs(0)), nnx.Param)


def test_weight_decay_mask_follows_open_clip_rule():
    mask = weight_decay_mask(_params())
    assert mask["proj"]["kernel"].value is True
    assert mask["positional_embedding"].value is True
    for no_decay in (
        mask["proj"]["bias"],
        mask["ln_final"]["scale"],
        mask["ln_final"]["bias"],
        mask["class_embedding"],
        mask["ln_proj"],  # 2-D, but named like a LayerNorm: open_clip leaves it undecayed
        mask["logit_scale"],
    ):
        assert no_decay.value is False


def test_stacked_block_parameters_decay_like_open_clips_per_block_tensors():
    """Blocks are stored [layers, ...]: a stacked bias is 2-D but must stay undecayed."""
    config = get_model_config("ViT-Tiny-8")
    shapes = param_shapes(abstract_model(config))
    mask = weight_decay_mask({path_to_key(path): np.zeros(shape, np.float32) for path, shape in shapes.items()})
    checked = set()
    for rule in names.name_table(config):
        torch_shape = rule.to_torch([np.zeros(shapes[p][rule.layer is not None:]) for p in rule.jax_paths]).shape
        key = rule.torch_key
        open_clip_decays = len(torch_shape) >= 2 and not any(n in key for n in ("bn", "ln", "bias", "logit_scale"))
        for path in rule.jax_paths:
            assert mask[path_to_key(path)] == open_clip_decays, (key, path)
            checked.add(path)
    assert checked == set(shapes)


def _numpy_adamw(params, grads_per_step, lrs, decay_mask, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2):
    """torch.optim.AdamW's update, written out for plain numpy arrays."""
    params = dict(params)
    mu = {name: np.zeros_like(value) for name, value in params.items()}
    nu = {name: np.zeros_like(value) for name, value in params.items()}
    for step, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for name, grad in grads.items():
            mu[name] = b1 * mu[name] + (1 - b1) * grad
            nu[name] = b2 * nu[name] + (1 - b2) * grad**2
            adam = (mu[name] / (1 - b1**step)) / (np.sqrt(nu[name] / (1 - b2**step)) + eps)
            decay = weight_decay * params[name] if decay_mask[name] else 0.0
            params[name] = params[name] - lr * (adam + decay)
    return params


def _flat(tree):
    """{'proj.kernel': np.ndarray, ...} of an NNX State."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {".".join(map(str, key_path_names(path))): np.asarray(value) for path, value in leaves}


def _random_grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, params, grads_per_step):
    """Applies the updates one by one; returns the params after every step and the last state."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for grads in grads_per_step:
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append(params)
    return history, state


def test_adamw_steps_equal_numpy_adamw():
    params = _params()
    grads = [_random_grads(params, seed) for seed in range(3)]
    got = _run(make_optimizer(_config(), TOTAL_STEPS), params, grads)[0][-1]

    schedule = make_schedule(_config(), TOTAL_STEPS)
    mask = _flat(weight_decay_mask(params))
    want = _numpy_adamw(_flat(params), [_flat(g) for g in grads], [float(schedule(s)) for s in range(3)], mask)
    got = _flat(got)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert not np.allclose(got["proj.kernel"], _flat(params)["proj.kernel"])


def test_gradient_clipping_scales_to_the_global_norm():
    params = _params()
    grads = _random_grads(params, 0)
    norm = float(optax.global_norm(grads))
    assert norm > 1.0, "the test gradient must be large enough to be clipped"
    _, state = _run(make_optimizer(_config(grad_clip_norm=0.5), TOTAL_STEPS), params, [grads])
    first_moment = state[1][0].mu  # chain(clip, adamw): adamw's first state is Adam's
    clipped = grads["proj"]["kernel"].value * 0.5 / norm
    np.testing.assert_allclose(first_moment["proj"]["kernel"].value, (1 - 0.9) * clipped, rtol=1e-5)


def test_global_negatives_accumulation_leaves_the_optimizer_plain():
    """The train step accumulates by itself (tests/test_accumulation.py): one call, one update."""
    params = _params()
    grads = _random_grads(params, 0)
    accumulating = _run(make_optimizer(_config(accumulate_steps=4), TOTAL_STEPS), params, [grads])[0][-1]
    plain = _run(make_optimizer(_config(), TOTAL_STEPS), params, [grads])[0][-1]
    for name, value in _flat(plain).items():
        np.testing.assert_array_equal(_flat(accumulating)[name], value, err_msg=name)


def test_accumulating_k_micro_steps_equals_one_step_on_the_mean_gradient():
    params, k = _params(), 3
    micro_grads = [_random_grads(params, seed) for seed in range(k)]
    mean_grad = jax.tree.map(lambda *g: sum(g) / k, *micro_grads)

    independent = _config(accumulate_steps=k, accumulate_mode="independent_microbatches")
    history, _ = _run(make_optimizer(independent, TOTAL_STEPS), params, micro_grads)
    single = _run(make_optimizer(_config(), TOTAL_STEPS), params, [mean_grad])[0][-1]

    for name, value in _flat(single).items():
        np.testing.assert_allclose(_flat(history[-1])[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
        for partial in history[:-1]:
            np.testing.assert_array_equal(_flat(partial)[name], _flat(params)[name])


@pytest.mark.parametrize(
    "config, message",
    [
        (_config(name="sgd"), "optimizer.name 'sgd' is unknown"),
        (_config("linear"), "schedule.name 'linear' is unknown"),
        (_config(warmup=TOTAL_STEPS), "must exceed schedule.warmup_steps"),
        (_config(accumulate_steps=0), "accumulate_steps must be >= 1"),
        (_config(accumulate_mode="average"), "accumulate_mode 'average' is unknown"),
    ],
)
def test_bad_config_gives_clear_errors(config, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(config, TOTAL_STEPS)


# ---- frozen towers (optimizer.freeze, open_clip's --lock-image / --lock-text) ---------------------


def _tiny_clip_params(seed=0):
    """Flat {name: array} with the names of a CLIP's train state (shapes cut to at most 3 per axis)."""
    shapes = param_shapes(abstract_model(get_model_config("ViT-Tiny-8")))
    rng = np.random.default_rng(seed)
    return {path_to_key(path): jnp.asarray(rng.normal(size=tuple(min(d, 3) for d in shape)), jnp.float32)
            for path, shape in shapes.items()}


def _state_arrays(opt_state) -> dict:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)}


@pytest.mark.parametrize("tower, prefix", [("image", "visual."), ("text", "text.")])
def test_frozen_tower_keeps_its_bits_and_has_no_optimizer_state(tower, prefix):
    params = _tiny_clip_params()
    grads = [_random_grads(params, seed) for seed in range(3)]
    config = _config(grad_clip_norm=1.0, freeze=tower)
    history, state = _run(make_optimizer(config, TOTAL_STEPS), params, grads)
    after = history[-1]

    frozen = [name for name in params if name.startswith(prefix)]
    trained = [name for name in params if not name.startswith(prefix)]
    assert frozen and "logit_scale" in trained
    for name in frozen:
        assert np.asarray(after[name]).tobytes() == np.asarray(params[name]).tobytes(), name
    for name in trained:
        assert not np.array_equal(after[name], params[name]), name
    # No moment, count or accumulator mentions a frozen parameter; the trained ones have mu and nu.
    leaves = _state_arrays(state)
    assert not [path for path in leaves if any(f"'{name}'" in path for name in frozen)]
    moments = sum(int(np.size(leaf)) for leaf in leaves.values() if jnp.issubdtype(leaf.dtype, jnp.floating))
    assert moments == 2 * sum(int(np.size(params[name])) for name in trained)


def test_trained_tower_updates_as_if_the_frozen_one_did_not_exist():
    """Clipping and AdamW see only the trained parameters: same result as an optimiser over them alone."""
    params = _tiny_clip_params()
    grads = [_random_grads(params, seed) for seed in range(2)]
    after = _run(make_optimizer(_config(grad_clip_norm=1.0, freeze="image"), TOTAL_STEPS), params, grads)[0][-1]

    def text_only(tree):
        return {name: value for name, value in tree.items() if not name.startswith("visual.")}

    alone = _run(make_optimizer(_config(grad_clip_norm=1.0), TOTAL_STEPS), text_only(params),
                 [text_only(g) for g in grads])[0][-1]
    for name, value in alone.items():
        np.testing.assert_allclose(after[name], value, rtol=1e-6, atol=1e-7, err_msg=name)


def test_frozen_tower_in_the_sharded_train_step():
    """The optimiser state of the real train state (sharded on 8 devices) leaves the frozen tower out."""
    from bioclip_jax.parallel.mesh import make_mesh
    from bioclip_jax.parallel.sharding import host_batch_to_global
    from bioclip_jax.train import state as state_lib
    from bioclip_jax.train.loop import initial_params
    from bioclip_jax.train.step import make_train_step
    from tests.train_helpers import smoke_config

    config = smoke_config("", total_steps=4, data__batch_size=8, optimizer__freeze="image")
    mesh = make_mesh(data=4, fsdp=2)
    skeleton = state_lib.model_skeleton(config)
    layout = state_lib.state_layout(config, skeleton, mesh)
    params = initial_params(config)[0]
    state = state_lib.initial_state(layout, params)
    step = make_train_step(config, skeleton, layout, mesh, make_schedule(config, state_lib.optimizer_updates(config)))
    rng = np.random.default_rng(0)
    tokens = np.zeros((8, 48), np.int32)
    tokens[:, 0], tokens[:, 1:6], tokens[:, 6] = 49406, rng.integers(1, 40000, (8, 5)), 49407
    for _ in range(2):
        batch = {"image": rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8), "tokens": tokens}
        state, _ = step(state, host_batch_to_global(batch, mesh))
    state = jax.device_get(state)
    assert not [path for path in _state_arrays(state["opt_state"]) if "visual." in path]
    for name, value in params.items():
        changed = not np.array_equal(state["params"][name], value)
        assert changed != name.startswith("visual."), name


def test_unknown_frozen_tower_is_refused():
    with pytest.raises(ValueError, match="optimizer.freeze 'vision' is unknown"):
        make_optimizer(_config(freeze="vision"), TOTAL_STEPS)
