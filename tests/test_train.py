"""Training on 8 simulated CPU devices: mesh equivalence, exact resume, resharding, bad data."""

import glob
import io
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from bioclip_jax.checkpoint.model_dir import load_params
from train_helpers import as_array, losses, run, shards  # noqa: F401 - shards is a fixture


def test_same_losses_for_data_fsdp_and_mixed_meshes(shards, tmp_path):
    data = as_array(run(tmp_path / "data", shards, mesh__data=8, mesh__fsdp=1))
    fsdp = as_array(run(tmp_path / "fsdp", shards, mesh__data=1, mesh__fsdp=8))
    mixed = as_array(run(tmp_path / "mixed", shards, mesh__data=2, mesh__fsdp=4))
    assert len(data) == 6 and np.all(np.isfinite(data))
    # The steps move the model (real learning is checked in test_learning.py; six noisy steps
    # over random text types do not always end below the first loss).
    assert data[1:].min() < data[0] - 0.1
    np.testing.assert_allclose(fsdp, data, rtol=2e-5)
    np.testing.assert_allclose(mixed, data, rtol=2e-5)


def test_stop_and_resume_is_bitwise_identical(shards, tmp_path):
    straight = run(tmp_path / "straight", shards)
    first = run(tmp_path / "resumed", shards, stop_after=3)
    assert max(losses(first)) == 3
    resumed = run(tmp_path / "resumed", shards)
    assert losses(resumed) == losses(straight)  # exact, data order included
    a, b = load_params(str(tmp_path / "straight")), load_params(str(tmp_path / "resumed"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_onto_4(shards, tmp_path):
    """Slow; the fast version: test_multiprocess resumes a 2-process run on another layout."""
    reference = losses(run(tmp_path / "ref", shards))
    run(tmp_path / "moved", shards, stop_after=3)
    moved = losses(run(tmp_path / "moved", shards, mesh__num_devices=4))
    for step in (4, 5, 6):
        assert moved[step] == pytest.approx(reference[step], rel=2e-5)


def _jpeg_count(shard: str) -> int:
    with tarfile.open(shard) as tar:
        return sum(name.endswith(".jpg") for name in tar.getnames())


def test_corrupt_sample_is_skipped_and_counted(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    first = sorted(glob.glob(str(broken / "shard-*.tar")))[0]
    members = []
    with tarfile.open(first) as tar:
        for member in tar.getmembers():
            members.append((member, tar.extractfile(member).read()))
    jpgs = [i for i, (m, _) in enumerate(members) if m.name.endswith(".jpg")]
    garbage = b"\xff\xd8\xff\xe0 definitely not a complete jpeg"
    for index in jpgs[:1]:
        member, _ = members[index]
        member.size = len(garbage)
        members[index] = (member, garbage)
    with tarfile.open(first, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, payload in members:
            tar.addfile(member, io.BytesIO(payload))
    for stale_index in glob.glob(str(broken / "*.idx.json")):
        os.remove(stale_index)

    # 5 batches of 40 read the shuffled stream of 100 samples exactly twice over: the one corrupted
    # sample is replaced once in each pass.
    assert sum(_jpeg_count(shard) for shard in glob.glob(str(broken / "shard-*.tar"))) == 100
    records = run(tmp_path / "run", str(broken), total_steps=5, stop_after=5, data__batch_size=40)
    assert max(losses(records)) == 5  # the run completed
    skipped = [r["skipped_samples"] for r in records if "skipped_samples" in r]
    assert skipped[-1] == 2


def test_crash_during_save_leaves_previous_checkpoint_usable(shards, tmp_path):
    run(tmp_path / "run", shards, stop_after=3)
    # What a crash in the middle of saving step 6 leaves behind: an unfinished temporary folder.
    partial = tmp_path / "run" / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
    (partial / "params").mkdir(parents=True)
    (partial / "params" / "garbage").write_bytes(b"\x00" * 10)
    params = load_params(str(tmp_path / "run"))
    assert params and all(np.all(np.isfinite(v)) for v in params.values())
    resumed = losses(run(tmp_path / "run", shards))
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]


def test_misspelt_override_names_the_field(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bioclip_jax.train", "--config=configs/synthetic_tiny.py:smoke",
         f"--workdir={tmp_path}", "--config.optimizer.lrr=0.1"],
        capture_output=True, text=True, cwd=os.path.join(os.path.dirname(__file__), ".."), timeout=120)
    assert result.returncode != 0
    assert "lrr" in result.stderr


def test_sigmoid_loss_trains_and_exports_logit_bias(shards, tmp_path):
    import open_clip

    from bioclip_jax import create_model, export_open_clip

    records = run(tmp_path / "siglip", shards, loss__kind="sigmoid")
    values = as_array(records)
    assert len(values) == 6 and np.all(np.isfinite(values))
    assert "logit_bias" in records[-1]
    model = create_model(None, str(tmp_path / "siglip"))
    export_open_clip(model, str(tmp_path / "export"))
    reference = open_clip.create_model(f"local-dir:{tmp_path / 'export'}")
    assert float(reference.logit_bias) == pytest.approx(float(model.logit_bias[...]))
    assert float(reference.logit_bias) != -10.0  # it was trained


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_saves_and_stops_with_the_stopped_status_and_no_export(shards, tmp_path, signum):
    """A stop is not a finish: checkpoint at the signal's step, exit 75, no export, no DONE."""
    import signal
    import time

    from bioclip_jax.checkpoint.model_dir import latest_step_dir
    from bioclip_jax.exit_codes import STOPPED
    from bioclip_jax.train.metrics import read_metrics

    workdir = tmp_path / "preempted"
    command = [sys.executable, "-m", "bioclip_jax.train", "--config=configs/synthetic_tiny.py:smoke",
               f"--workdir={workdir}", f"--config.data.train_shards={shards}", "--config.total_steps=500",
               "--config.checkpoint.every_steps=1000"]
    process = subprocess.Popen(command, cwd=os.path.join(os.path.dirname(__file__), ".."),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while len(read_metrics(str(workdir))) < 2 and time.time() < deadline and process.poll() is None:
            time.sleep(0.5)
        assert process.poll() is None, process.stdout.read()
        process.send_signal(getattr(signal, signum))
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == STOPPED, output
    assert f"stopped by {signum}" in output and "Traceback" not in output, output
    saved = int(os.path.basename(latest_step_dir(str(workdir))))
    assert 2 <= saved < 500  # a save at the step where the signal arrived, not at a schedule boundary
    assert not (workdir / "open_clip").exists() and not (workdir / "DONE").exists()


def test_bfloat16_compute_with_remat_tracks_float32(shards, tmp_path):
    reference = as_array(run(tmp_path / "f32", shards, total_steps=4, stop_after=4))
    low = as_array(run(tmp_path / "bf16", shards, total_steps=4, stop_after=4, dtype="bfloat16", remat="full"))
    assert np.all(np.isfinite(low))
    np.testing.assert_allclose(low, reference, rtol=3e-2)
    params = load_params(str(tmp_path / "bf16"))
    assert all(v.dtype == np.float32 for v in params.values())  # parameters stay float32


def test_scanned_blocks_train_like_the_unrolled_loop(shards, tmp_path):
    # data=8: with fsdp, the unrolled loop launches so many independent collectives that 8 simulated
    # devices on a 2-core CPU can exhaust XLA:CPU's thread pool and hit its 40 s collective timeout.
    mesh = dict(mesh__data=8, mesh__fsdp=1)
    unrolled = as_array(run(tmp_path / "unrolled", shards, scan_layers=False, **mesh))
    scanned = as_array(run(tmp_path / "scanned", shards, scan_layers=True, **mesh))
    assert len(unrolled) == 6 and np.all(np.isfinite(unrolled))
    np.testing.assert_allclose(scanned, unrolled, rtol=2e-5)
    # Remat inside the scan: test_remat_attention.py::test_every_remat_choice_trains_to_the_same_losses.


_CACHED_START = """
import sys
import jax
hits = []
jax.monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)
sys.path.insert(0, "tests")
from train_helpers import smoke_config
from bioclip_jax.train.loop import train
shards, cache, workdir = sys.argv[1:]
train(smoke_config(shards, compilation_cache_dir=cache), workdir, stop_after=1)
print("cache hits", len(hits))
"""


def test_a_restarted_run_loads_its_compiled_programs_from_the_cache(shards, tmp_path):
    """config.compilation_cache_dir is switched on at start-up: the first run fills the folder, a
    second process starting the same run finds every program there and compiles nothing new."""
    cache = tmp_path / "xla"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu",
               XLA_FLAGS=env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", ""))

    def start(name: str) -> tuple[int, set]:
        result = subprocess.run([sys.executable, "-c", _CACHED_START, shards, str(cache), str(tmp_path / name)],
                                cwd=os.path.join(os.path.dirname(__file__), ".."), env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        hits = int(result.stdout.rsplit("cache hits", 1)[1])
        return hits, set(os.listdir(cache)) if cache.exists() else set()

    _, after_first = start("first")
    assert after_first, "the first run wrote nothing to the compilation cache"
    hits, after_second = start("second")
    assert hits > 0 and after_second == after_first, \
        f"{hits} cache hits; new entries: {sorted(after_second - after_first)}"
