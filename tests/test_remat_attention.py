"""Remat policies and attention kernels are config choices that change speed and memory, never numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bioclip_jax.models import attention
from bioclip_jax.models.clip import build_model
from bioclip_jax.models.config import get_model_config
from bioclip_jax.parallel.mesh import make_mesh
from bioclip_jax.train import state as state_lib
from bioclip_jax.train.config_base import base_config
from bioclip_jax.train.loop import initial_params
from bioclip_jax.train.optimizer import make_schedule
from bioclip_jax.train.step import make_train_step

TINY = get_model_config("ViT-Tiny-8")
POLICY = "dots_with_no_batch_dims_saveable"


def tiny_config(**fields):
    config = base_config()
    config.model.name = "ViT-Tiny-8"
    config.data.batch_size = 4
    config.total_steps = 10
    config.schedule.name, config.schedule.warmup_steps = "constant", 0
    config.optimizer.lr = 1e-3
    for name, value in fields.items():
        config[name] = value
    return config


def train_losses(steps: int = 3, **fields) -> np.ndarray:
    """Losses of `steps` train steps of the tiny model on one device, built as the training loop builds it."""
    config = tiny_config(**fields)
    mesh = make_mesh(devices=jax.devices()[:1])
    skeleton = state_lib.model_skeleton(config)
    built = nnx.merge(skeleton.graphdef, skeleton.template, skeleton.rest)
    # The choice reaches both towers' blocks.
    assert built.visual.transformer.remat == built.text.transformer.remat == config.remat
    layout = state_lib.state_layout(config, skeleton, mesh)
    step = make_train_step(config, skeleton, layout, mesh, make_schedule(config, config.total_steps))
    state = state_lib.initial_state(layout, initial_params(config)[0])
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        tokens = rng.integers(1, 1000, (4, 77)).astype(np.int32)
        tokens[:, 20], tokens[:, 21:] = 49407, 0
        batch = {"image": rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8), "tokens": tokens}
        state, metrics = step(state, jax.device_put(batch, jax.devices()[0]))
        losses.append(float(metrics["loss"]))
    return np.array(losses)


def test_every_remat_choice_trains_to_the_same_losses():
    reference = train_losses(remat="none")
    assert reference[-1] < reference[0]  # the steps move the model
    for choice in ("full", POLICY):
        np.testing.assert_allclose(train_losses(remat=choice), reference, rtol=1e-5, err_msg=choice)


CHECKPOINT_PRIMITIVES = ("remat2", "checkpoint")  # jax.checkpoint's primitive, by jax version


def _checkpoints(jaxpr) -> list:
    """Every `jax.checkpoint` equation in a jaxpr, nested ones (inside a scan) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in CHECKPOINT_PRIMITIVES:
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found.extend(_checkpoints(inner))
    return found


@pytest.mark.parametrize("scan", [True, False])
def test_a_named_remat_policy_reaches_every_block(scan):
    model = build_model(TINY, remat=POLICY)
    model.visual.transformer.scan = scan
    graphdef, params = nnx.split(model)
    images = jnp.zeros((1, 64, 64, 3))
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p).image_features(images))  # noqa: E731
    found = _checkpoints(jax.make_jaxpr(loss)(params).jaxpr)
    assert len(found) == (1 if scan else TINY.vision.layers), "not every block is checkpointed"
    assert all(e.params["policy"] == getattr(jax.checkpoint_policies, POLICY) for e in found)
    # Inside the scan the loop already stops XLA merging recomputation into the forward pass.
    assert all(e.params["prevent_cse"] is (not scan) for e in found)


def test_remat_flag_of_older_callers_still_means_full_or_none():
    assert build_model(TINY, remat=True).visual.transformer.remat == "full"
    assert build_model(TINY, remat=False).text.transformer.remat == "none"


@pytest.mark.parametrize("field, value, choices", [
    ("remat", "sometimes", ["none", "full", POLICY]),
    ("attention", "flash", ["auto", "xla", "cudnn", "head_major"]),
])
def test_unknown_choice_names_the_field_and_the_choices(field, value, choices):
    with pytest.raises(ValueError) as error:
        state_lib.model_skeleton(tiny_config(**{field: value}))
    message = str(error.value)
    assert message.startswith(f"config.{field}={value!r}") and message.count(".") <= 1
    assert all(choice in message for choice in choices)


def assert_close(actual, desired, relative: float, scale: float | None = None) -> None:
    """Equal up to `relative` of `scale` (default: the array's largest magnitude): fp32 round-off
    of a different order of operations."""
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    scale = np.abs(desired).max() if scale is None else scale
    assert np.abs(actual - desired).max() <= relative * scale


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    # End of text in the middle, padding after it: only a causal kernel ignores the padding.
    tokens = rng.integers(1, 1000, (2, 77)).astype(np.int32)
    tokens[:, 9], tokens[:, 10:] = 49407, 7
    return images, tokens


def _features_and_grads(kernel: str, dtype):
    model = build_model(TINY, seed=1, dtype=dtype, attention=kernel)
    graphdef, params = nnx.split(model)
    images, tokens = _inputs()

    def loss(p):
        merged = nnx.merge(graphdef, p)
        image, text = merged.image_features(images), merged.text_features(tokens)
        return jnp.sum(image ** 2) + jnp.sum(text ** 2), (image, text)

    (_, features), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return features, jax.tree.leaves(grads)


def test_xla_kernel_matches_the_head_major_path_in_both_towers():
    ours, our_grads = _features_and_grads("head_major", jnp.float32)
    token_major, token_major_grads = _features_and_grads("xla", jnp.float32)
    for a, b in zip(token_major, ours):
        assert_close(a, b, 1e-5)
    # Relative to the largest gradient: the key bias's is zero in exact arithmetic (softmax ignores
    # a shift shared by all keys), so each side's is round-off alone.
    scale = max(np.abs(np.asarray(g)).max() for g in our_grads)
    for a, b in zip(token_major_grads, our_grads):
        assert_close(a, b, 1e-5, scale)


def test_cudnn_kernel_runs_the_towers_at_an_even_length(monkeypatch):
    calls = []

    def fake_cudnn(q, k, v, mask, valid_tokens=None, **_):
        calls.append((q.shape[1], attention._is_causal(mask), valid_tokens))
        return q

    monkeypatch.setattr(attention, "cudnn", fake_cudnn)
    model = build_model(TINY, seed=1, dtype=jnp.bfloat16, attention="cudnn")
    images, tokens = _inputs()
    jax.eval_shape(model.image_features, images)
    jax.eval_shape(model.text_features, tokens)
    # 65 image tokens run at 66 with the last key masked; 77 text positions at 78, causal.
    assert set(calls) == {(66, False, 65), (78, True, None)}


def test_cudnn_key_lengths_reach_jax_as_an_int32_vector(monkeypatch):
    seen = {}
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda q, k, v, **kw: seen.update(kw) or q)
    q = jnp.zeros((3, 6, 2, 8), jnp.bfloat16)
    attention.cudnn(q, q, q, None, valid_tokens=5)
    np.testing.assert_array_equal(seen["key_value_seq_lengths"], [5, 5, 5])
    assert seen["implementation"] == "cudnn" and "is_causal" not in seen
    attention.cudnn(q, q, q, attention.causal_mask(6))
    assert seen["is_causal"] and "mask" not in seen


def test_xla_kernel_tracks_the_head_major_path_in_bfloat16():
    images, tokens = _inputs()
    ours, fused = (build_model(TINY, seed=1, dtype=jnp.bfloat16, attention=kernel) for kernel in ("head_major", "xla"))
    assert_close(fused.encode_image(images), ours.encode_image(images), 2e-2)
    assert_close(fused.encode_text(tokens), ours.encode_text(tokens), 2e-2)


def test_any_other_mask_reaches_the_fused_kernel_as_a_mask():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 3, 6, 8)), jnp.float32) for _ in range(3))  # head-major
    mask = rng.random((6, 6)) > 0.3
    mask[:, 0] = True  # every query sees at least one key
    head_major = attention.head_major(q, k, v, mask)
    fused = attention.fused(*(t.transpose(0, 2, 1, 3) for t in (q, k, v)), mask, "xla").transpose(0, 2, 1, 3)
    np.testing.assert_allclose(fused, head_major, rtol=1e-5, atol=1e-6)


def test_bfloat16_logits_are_accumulated_in_float32():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 5, 8)), jnp.bfloat16) for _ in range(3))
    jaxpr = jax.make_jaxpr(lambda q, k, v: attention.head_major(q, k, v, None))(q, k, v).jaxpr
    products = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert products[0].params["preferred_element_type"] == jnp.float32  # the scores, not a cast afterwards
    assert not any(e.primitive.name == "convert_element_type" and e.invars[0] is products[0].outvars[0]
                   for e in jaxpr.eqns)


@pytest.mark.parametrize("choice, dtype, backend, kernel", [
    ("auto", jnp.float32, "cpu", "head_major"),
    ("auto", jnp.bfloat16, "cpu", "head_major"),
    ("auto", jnp.bfloat16, "gpu", "cudnn"),
    ("auto", jnp.float32, "gpu", "xla"),
    ("auto", jnp.bfloat16, "tpu", "xla"),
    ("xla", jnp.float32, "cpu", "xla"),
    ("cudnn", jnp.bfloat16, "gpu", "cudnn"),
    ("cudnn", jnp.bfloat16, "cpu", "cudnn"),  # built anywhere, so that a CPU machine can lower it for CUDA
])
def test_auto_picks_cudnn_on_gpu_xla_on_tpu_and_head_major_on_cpu(choice, dtype, backend, kernel):
    assert attention.resolve(choice, dtype, backend) == kernel


def test_auto_takes_xla_where_cudnn_does_not_run_at_the_towers_shape(monkeypatch):
    tried = []
    monkeypatch.setattr(attention, "cudnn_runs", lambda *shape: tried.append(shape) or False)
    assert attention.resolve("auto", jnp.bfloat16, "gpu", head_dim=64, tokens=197, heads=12) == "xla"
    assert tried == [(198, 12, 64, "bfloat16", False)]  # tried at the even length the tower would run
    assert attention.resolve("auto", jnp.bfloat16, "gpu", head_dim=160, tokens=197, heads=12) == "xla"
    assert len(tried) == 1  # a head cuDNN never takes is not even tried


def test_a_failing_cudnn_probe_is_a_warning_and_a_no():
    attention.cudnn_runs.cache_clear()
    assert attention.cudnn_runs(6, 2, 8, "bfloat16", True) is False  # no cuDNN on a CPU machine
    attention.cudnn_runs.cache_clear()


@pytest.mark.parametrize("dtype, head_dim, says", [(jnp.float32, 64, "needs bfloat16 or float16"),
                                                   (jnp.bfloat16, 60, "multiple of 8")])
def test_cudnn_where_it_cannot_run_says_why(dtype, head_dim, says):
    with pytest.raises(ValueError, match=says):
        attention.resolve("cudnn", dtype, "gpu", head_dim=head_dim)


def test_compiling_cudnn_attention_for_the_cpu_is_refused_in_one_sentence():
    with pytest.raises(ValueError) as error:
        state_lib.model_skeleton(tiny_config(attention="cudnn", dtype="bfloat16"))
    message = str(error.value)
    assert message.startswith("config.attention='cudnn' runs on NVIDIA GPUs only") and message.count(".") == 1
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs only"):
        build_model(TINY, dtype=jnp.bfloat16, attention="cudnn").encode_image(np.zeros((1, 64, 64, 3)))
