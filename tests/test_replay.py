"""BioCLIP 2's experience replay: an exact count of general pairs per batch, a second visual
projector with its own loss, exact resume, and nothing changed when replay is off."""

import os

import jax
import numpy as np
import pytest

from bioclip_jax.cli import export as export_cli
from bioclip_jax.cli import make_synthetic as make_synthetic_cli
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.data.pipeline import make_train_dataset
from bioclip_jax.data.replay import PROJECTOR_KEY, REPLAY_PROJECTOR_KEY, ReplayMixer, make_replay_dataset
from bioclip_jax.data.shard_patterns import expand_shard_pattern
from bioclip_jax.data.tar_source import TarShardSource
from bioclip_jax.parallel.mesh import make_mesh
from bioclip_jax.tokenizer import get_tokenizer
from bioclip_jax.train import state as state_lib
from bioclip_jax.train.loop import initial_params, to_devices
from bioclip_jax.train.step import make_grad_fn

from train_helpers import run, smoke_config

REPLAY = 8  # per global batch of 16 tree-of-life pairs: one replay row per simulated device


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay_data")
    code = make_synthetic_cli.main(["--output", str(out), "--species", "24", "--images-per-species", "6",
                                    "--held-out-species", "4", "--seed", "3", "--samples-per-shard", "40",
                                    "--generic-captions", "48", "--no-progress"])
    assert code == 0
    return {"train": str(out / "train"), "generic": str(out / "generic")}


def _replay_overrides(data) -> dict:
    return dict(data__replay_shards=data["generic"], data__replay_per_batch=REPLAY, data__workers=0)


def _replay_config(data, **overrides):
    return smoke_config(data["train"], **_replay_overrides(data), **overrides)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """A six-step run with replay, not interrupted: (its workdir, its metrics records)."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, run(workdir, data["train"], **_replay_overrides(data))


def test_generic_caption_set_is_jpg_and_txt_pairs(data):
    source = TarShardSource(expand_shard_pattern(data["generic"] + "/*.tar"))
    assert len(source) == 48
    sample = source[0]
    assert sample["jpg"][:2] == b"\xff\xd8" and sample["txt"].decode().startswith("a photo of ")


def _host_batches(config, host: int, hosts: int, steps: int) -> list[dict]:
    tokenizer = get_tokenizer("ViT-Tiny-8")
    main = make_train_dataset(config.data.train_shards, global_batch_size=config.data.batch_size, seed=config.seed,
                              text_type=config.data.text_type, tokenizer=tokenizer, image_size=64,
                              process_index=host, process_count=hosts)
    replay = make_replay_dataset(config, tokenizer=tokenizer, image_size=64, process_index=host, process_count=hosts)
    mixed = ReplayMixer(iter(main), iter(replay))
    return [next(mixed) for _ in range(steps)]


def test_every_batch_holds_exactly_the_replay_count_over_hosts(data):
    config = _replay_config(data)
    hosts = [_host_batches(config, host, 2, steps=3) for host in range(2)]
    for step in range(3):
        rows = [batches[step]["replay_image"].shape[0] for batches in hosts]
        assert rows == [REPLAY // 2] * 2
        assert all(batches[step]["image"].shape[0] == 8 for batches in hosts)
        assert all(batches[step]["replay_tokens"].shape == (REPLAY // 2, 77) for batches in hosts)
    # The same mix whatever the host count: one host sees both halves' replay rows.
    alone = _host_batches(config, 0, 1, steps=3)
    for step in range(3):
        joined = np.concatenate([batches[step]["replay_tokens"] for batches in hosts])
        assert sorted(map(bytes, joined)) == sorted(map(bytes, alone[step]["replay_tokens"]))
    # The replay rows carry the generic captions, not tree-of-life names.
    tokenizer = get_tokenizer("ViT-Tiny-8")
    assert not np.array_equal(alone[0]["replay_tokens"][:1], alone[0]["tokens"][:1])
    expected = tokenizer(["a photo of"])[0][:4]
    assert all(np.array_equal(row[:4], expected) for row in alone[0]["replay_tokens"])


def test_replay_adds_its_own_loss_and_leaves_the_tree_of_life_part_alone(data, tmp_path):
    plain = run(tmp_path / "plain", data["train"], stop_after=2, data__workers=0)
    mixed = run(tmp_path / "mixed", data["train"], stop_after=2, **_replay_overrides(data))
    first_plain = next(r for r in plain if r["step"] == 1)
    first_mixed = next(r for r in mixed if r["step"] == 1)
    assert "loss_replay" not in first_plain  # replay off: today's step and metrics
    # Step 1 starts from the same parameters (the replay projector starts as a copy of the
    # model's own), so the tree-of-life part is the replay-off loss and the replay part is extra.
    assert first_mixed["loss_tree_of_life"] == pytest.approx(first_plain["loss"], rel=1e-6)
    assert first_mixed["loss"] == pytest.approx(first_mixed["loss_tree_of_life"] + first_mixed["loss_replay"],
                                                rel=1e-6)
    assert first_mixed["loss_replay"] > 0
    # Images per second and MFU count the replay pairs too: each runs through both towers.
    batch = smoke_config(data["train"]).data.batch_size
    assert first_plain["images_per_sec"] * first_plain["seconds_per_step"] == pytest.approx(batch)
    assert first_mixed["images_per_sec"] * first_mixed["seconds_per_step"] == pytest.approx(batch + REPLAY)
    flops = {name: r["model_tflops_per_device"] * r["seconds_per_step"] for name, r in
             (("plain", first_plain), ("mixed", first_mixed))}
    assert flops["mixed"] / flops["plain"] == pytest.approx((batch + REPLAY) / batch)


def _gradients(config, params: dict, host_batch: dict) -> dict:
    """The train step's gradients (before the optimiser) on one batch, on 8 simulated devices."""
    mesh = make_mesh(data=8)
    grad_fn = jax.jit(make_grad_fn(config, state_lib.model_skeleton(config), mesh))
    _, grads = grad_fn({k: params[k] for k in state_lib.state_to_flat(state_lib.model_skeleton(config).template)},
                       to_devices(host_batch, mesh))
    return jax.device_get(grads)


def test_replay_projector_takes_the_gradient_of_the_replay_loss_only(data):
    config = _replay_config(data)
    batch = _host_batches(config, 0, 1, steps=1)[0]
    params = initial_params(config)[0]  # the replay projector starts as a copy of the main one
    np.testing.assert_array_equal(params[REPLAY_PROJECTOR_KEY], params[PROJECTOR_KEY])
    # So the replay term is the replay-off objective on the replay rows, with replay_proj in proj's place.
    off = smoke_config(data["train"])
    main = _gradients(off, params, {"image": batch["image"], "tokens": batch["tokens"]})
    replay = _gradients(off, params, {"image": batch["replay_image"], "tokens": batch["replay_tokens"]})
    mixed = _gradients(config, params, batch)

    assert np.abs(replay[PROJECTOR_KEY]).max() > 0
    expected = {key: main[key] + replay[key] for key in main}  # towers and temperature: both terms
    expected[PROJECTOR_KEY] = main[PROJECTOR_KEY]  # no replay term in the main projector
    expected[REPLAY_PROJECTOR_KEY] = replay[PROJECTOR_KEY]  # and nothing but it in the replay one
    assert set(mixed) == set(expected)
    for key, want in expected.items():
        np.testing.assert_allclose(mixed[key], want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=key)


def test_replay_off_model_has_no_replay_projector():
    config = smoke_config("unused")
    off = state_lib.state_to_flat(state_lib.model_skeleton(config).template)
    config.data.replay_per_batch = REPLAY
    on = state_lib.state_to_flat(state_lib.model_skeleton(config).template)
    assert REPLAY_PROJECTOR_KEY not in off and set(on) - set(off) == {REPLAY_PROJECTOR_KEY}


def test_replay_projector_drifts_away_from_the_main_one(data, straight):
    start = initial_params(_replay_config(data))[0][PROJECTOR_KEY]  # where both projectors start
    trained = model_dir.load_params(str(straight[0]))
    proj, replay_proj = (trained[model_dir.key_to_path(key)] for key in (PROJECTOR_KEY, REPLAY_PROJECTOR_KEY))
    moved = {"proj": np.linalg.norm(proj - start), "replay_proj": np.linalg.norm(replay_proj - start)}
    # Adam moves every entry that has a gradient by about the learning rate: the replay projector
    # moves as far as the main one (weight decay alone would move it some 50x less)...
    assert moved["replay_proj"] > 0.5 * moved["proj"] > 0
    # ... and elsewhere, since it learns from other pairs.
    assert np.linalg.norm(replay_proj - proj) > 0.5 * moved["replay_proj"]


def test_resume_with_replay_is_exact_and_the_projector_is_checkpointed(data, straight, tmp_path, capsys):
    replay = _replay_overrides(data)
    straight = straight[1]
    run(tmp_path / "resumed", data["train"], stop_after=3, **replay)
    assert REPLAY_PROJECTOR_KEY in model_dir.param_keys(str(tmp_path / "resumed"))
    assert export_cli.main(["--checkpoint", str(tmp_path / "resumed"), "--output", str(tmp_path / "export")]) == 0
    out = capsys.readouterr().out
    assert f"replay projector ({REPLAY_PROJECTOR_KEY}" in out and "stays in" in out
    assert os.path.exists(tmp_path / "export" / "open_clip_config.json")

    resumed = run(tmp_path / "resumed", data["train"], **replay)
    keys = ("loss", "loss_tree_of_life", "loss_replay")
    table = {r["step"]: [r[k] for k in keys] for r in straight if "loss" in r}
    again = {r["step"]: [r[k] for k in keys] for r in resumed if "loss" in r}
    assert sorted(table) == sorted(again) == list(range(1, 7))
    np.testing.assert_allclose([again[s] for s in range(1, 7)], [table[s] for s in range(1, 7)], rtol=1e-6)


def test_replay_count_without_shards_is_one_sentence(data, tmp_path):
    config = smoke_config(data["train"], data__replay_per_batch=REPLAY)
    with pytest.raises(ValueError, match="needs config.data.replay_shards"):
        make_replay_dataset(config, tokenizer=get_tokenizer("ViT-Tiny-8"), image_size=64)
