"""gs:// workdirs, model directories, exports and metrics, against a real local GCS server.

Also what any storage needs on a pod: a checkpoint written by 8 devices loads in a
1-device process, a resumed run logs each step once, exported weights are readable by
others (umask), and a damaged weights file is named in one sentence.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import open_clip
import pytest
from etils import epath
from PIL import Image

from bioclip_jax import create_model, export_open_clip, save_model
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.cli import main as cli
from bioclip_jax.convert import state_dict_io
from bioclip_jax.cli import eval as eval_cli
from bioclip_jax.evaluate import results
from bioclip_jax.evaluate.watch import log_step
from bioclip_jax.models.params import flat_params
from bioclip_jax.pretrained import model_metadata
from bioclip_jax.train.metrics import MetricsWriter, drop_after, read_metrics
from gcs_server import gcs_bucket, gcs_dir, gcs_env  # noqa: F401 - fixtures
from train_helpers import run, shards  # noqa: F401 - fixture

TINY = "ViT-Tiny-8"


@pytest.fixture(autouse=True)
def _no_local_gs_folder(tmp_path, monkeypatch):
    """A gs:// URL mistaken for a local path becomes a folder "gs:" in the working directory."""
    monkeypatch.chdir(tmp_path)
    yield
    for root in (tmp_path, tempfile.gettempdir(), os.path.dirname(os.path.dirname(__file__))):
        assert not os.path.exists(os.path.join(root, "gs:")), f"a local folder gs: appeared in {root}"


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=str(key))


def _download(source: str, destination) -> str:
    """A local copy of a bucket folder (flat), for libraries that read only local files (open_clip)."""
    os.makedirs(destination, exist_ok=True)
    for item in epath.Path(source).iterdir():
        (epath.Path(destination) / item.name).write_bytes(item.read_bytes())
    return str(destination)


def test_model_directory_and_export_in_bucket(gcs_dir, tmp_path):
    model = create_model(TINY, seed=1)
    save_model(model, f"{gcs_dir}/model")
    _same(flat_params(model), model_dir.load_params(f"{gcs_dir}/model"))
    assert cli.main(["export", "--checkpoint", f"{gcs_dir}/model", "--output", f"{gcs_dir}/export"]) == 0
    assert cli.main(["import", "--pretrained", f"local-dir:{gcs_dir}/export", "--output", f"{gcs_dir}/again"]) == 0
    _same(flat_params(model), flat_params(create_model(None, f"{gcs_dir}/again")))
    open_clip.create_model_and_transforms(f"local-dir:{_download(f'{gcs_dir}/export', tmp_path / 'export')}")


_ONE_DEVICE = """
import sys, jax
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.cli import main as cli
assert jax.device_count() == 1
print("loaded", len(model_dir.load_params({workdir!r}, step=1)))
sys.exit(cli.main(["export", "--checkpoint", {workdir!r}, "--step", "1", "--output", {out!r}]))
"""


def test_fsdp_workdir_in_bucket_loads_and_exports_on_one_device(gcs_dir, shards, tmp_path):
    """Trained under 8-way fsdp into gs://; a 1-device process loads a chosen step and exports it to gs://."""
    workdir = f"{gcs_dir}/run"
    run(workdir, shards, total_steps=2, schedule__warmup_steps=1, checkpoint__every_steps=1, mesh__data=1,
        mesh__fsdp=8)
    assert model_dir.finished_steps(workdir) == [1, 2]
    assert [r["step"] for r in read_metrics(workdir) if "loss" in r] == [1, 2]

    env = {**os.environ, **gcs_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-c", _ONE_DEVICE.format(workdir=workdir, out=f"{gcs_dir}/export1")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-3000:]
    one_device = _download(f"{gcs_dir}/export1", tmp_path / "one_device")
    open_clip.create_model_and_transforms(f"local-dir:{one_device}")

    for step, out in (("1", "step1"), (None, "latest")):  # here, on 8 devices; the default step is the last
        assert cli.main(["export", "--checkpoint", workdir, "--output", str(tmp_path / out),
                         *(["--step", step] if step else [])]) == 0
    weights = {name: state_dict_io.read_state_dict(str(tmp_path / name / state_dict_io.WEIGHTS_NAME))
               for name in ("one_device", "step1", "latest")}
    _same(weights["one_device"], weights["step1"])
    assert any(not np.array_equal(weights["step1"][k], v) for k, v in weights["latest"].items())


@pytest.fixture
def bucket_workdir(gcs_dir):
    """A training workdir in the bucket with finished steps 3 and 6 (no training: quick)."""
    model = create_model(TINY, seed=2)
    workdir = f"{gcs_dir}/run"
    model_dir.write_model_json(workdir, *model_metadata(model))
    for step in (3, 6):
        model_dir.save_params(f"{workdir}/checkpoints/{step}", flat_params(model))
        # in a bucket a CheckpointManager commits the step folder with this file; save_params commits params/
        (epath.Path(workdir) / "checkpoints" / str(step) / "commit_success.txt").write_text("")
    (epath.Path(workdir) / "checkpoints" / "9" / "params" / "_METADATA").write_text("")  # not committed: ignored
    return workdir


def test_missing_step_is_one_sentence_listing_the_steps(bucket_workdir, gcs_dir, capsys):
    assert model_dir.finished_steps(bucket_workdir) == [3, 6]
    assert cli.main(["export", "--checkpoint", bucket_workdir, "--step", "4", "--output", f"{gcs_dir}/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step 4" in err and "available steps: 3, 6" in err, err
    with pytest.raises(ValueError, match="training workdir"):
        create_model(TINY, None, step=3)


def test_watch_writes_results_and_metrics_into_the_bucket(bucket_workdir, tmp_path):
    for name, colour in {"Corvus corax": (15, 15, 20), "Rosa canina": (40, 170, 60)}.items():
        folder = tmp_path / "birds" / "images" / name  # an "images" folder is named after its parent: birds
        folder.mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), colour, np.uint8)).save(folder / f"{i}.jpg")
    assert eval_cli.main(["--workdir", bucket_workdir, "--watch", "--watch-timeout=0", "--poll-seconds=0.01",
                          "--no-progress", f"--data=folder:{tmp_path / 'birds' / 'images'}", "--tasks=few_shot",
                          "--shots=1", "--trials=1", "--plot-embeddings=genus", "--batch-size=8"]) == 0
    assert [r["step"] for r in read_metrics(bucket_workdir)] == [3, 6]
    written = {p.name for p in (epath.Path(bucket_workdir) / "eval" / "6").iterdir()}
    assert {"results.json", "results.md", "results.png", "results_birds_genus.png"} <= written, written
    assert results.read_json(_download(f"{bucket_workdir}/eval/6", tmp_path / "e6") + "/results.json")


def test_metrics_in_bucket_and_drop_after(gcs_dir):
    """Training and `eval --watch` log into the same metrics.jsonl: in a bucket each line is an object
    of its own (no writer rewrites another's lines), and a resumed run drops only its own rows."""
    writer = MetricsWriter(gcs_dir, total_steps=10)
    for step in (1, 2, 3, 4):
        writer.write(step, {"loss": 1.0 / step})
    log_step(gcs_dir, 4, [results.summarise("set", "zero_shot_top1", [0.5])])
    assert [r["step"] for r in read_metrics(gcs_dir)] == [1, 2, 3, 4, 4]
    parts = list((epath.Path(gcs_dir) / "metrics.jsonl.d").iterdir())
    assert len(parts) == 5 and not (epath.Path(gcs_dir) / "metrics.jsonl").exists()
    writer.drop_after(2)  # a run resumed from step 2 logs steps 3 and 4 again
    writer.write(3, {"loss": 0.3})
    writer.close()
    records = read_metrics(gcs_dir)
    assert [(r["step"], r["loss"]) for r in records if "loss" in r] == [(1, 1.0), (2, 0.5), (3, 0.3)]
    assert [r["step"] for r in records if "loss" not in r] == [4]  # the watch's row stays
    assert (epath.Path(gcs_dir) / "tensorboard").is_dir()


def test_a_bucket_log_written_by_an_older_version_is_read_and_dropped_from(gcs_dir):
    """Older versions kept the whole log in one object; its rows come first, and drop_after still applies."""
    old = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.3}]
    (epath.Path(gcs_dir) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    MetricsWriter(gcs_dir, total_steps=10).write(4, {"loss": 0.2})
    assert [r["step"] for r in read_metrics(gcs_dir)] == [1, 2, 3, 4]
    assert drop_after(gcs_dir, 2) == 2
    assert read_metrics(gcs_dir) == old[:2]


def test_drop_after_keeps_the_watch_rows_of_a_local_log(tmp_path):
    """A resumed run rewrites its local log; rows of `eval --watch` (they carry a time) stay, whatever
    their step: the old code deleted them."""
    writer = MetricsWriter(tmp_path, total_steps=10)
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step})
    log_step(tmp_path, 3, [results.summarise("set", "zero_shot_top1", [0.5])])
    assert drop_after(tmp_path, 1) == 2
    assert [(r["step"], "loss" in r) for r in read_metrics(tmp_path)] == [(1, True), (3, False)]


def test_the_final_evaluation_is_dropped_when_a_finished_schedule_resumes(tmp_path):
    """A kill during the export leaves the final evaluation logged; the rerun evaluates again, so the
    old row goes (the old code kept both)."""
    writer = MetricsWriter(tmp_path, total_steps=6)
    writer.write(6, {"loss": 0.1})
    writer.write(6, {"eval/taxon_com/zero_shot_top1": 50.0})
    writer.drop_after(6)
    assert read_metrics(tmp_path) == [{"step": 6, "loss": 0.1}]
    writer.write(6, {"eval/taxon_com/zero_shot_top1": 50.0})
    MetricsWriter(tmp_path, total_steps=12).drop_after(6)  # a longer schedule goes on: nothing is repeated
    assert len(read_metrics(tmp_path)) == 2


def test_drop_after_keeps_local_rows_up_to_the_step(tmp_path):
    lines = [{"step": 1, "loss": 1}, {"step": 2, "loss": 2}, {"note": "no step"}, {"step": 3, "loss": 3}]
    text = "".join(json.dumps(r) + "\n" for r in lines)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 4, "lo')  # killed mid-write
    assert drop_after(tmp_path, 2) == 2
    assert read_metrics(tmp_path) == lines[:3]
    assert drop_after(tmp_path, 2) == 0


@pytest.mark.slow
def test_resumed_run_logs_each_step_once(tmp_path, shards):
    """Steps logged after the last checkpoint are logged again on resume; only once may remain.
    Slow; the fast versions are the drop_after tests above, local and in a bucket."""
    workdir = tmp_path / "run"
    run(workdir, shards, total_steps=4, checkpoint__every_steps=2)
    epath.Path(workdir / "checkpoints" / "4").rmtree()  # as if the job died before saving step 4
    records = run(workdir, shards, total_steps=4, checkpoint__every_steps=2)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


def test_exported_weights_honour_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        export_open_clip(create_model(TINY, seed=3), str(tmp_path / "export"))
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "export").iterdir()}
    assert modes == {state_dict_io.WEIGHTS_NAME: 0o644, state_dict_io.CONFIG_NAME: 0o644}


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_are_one_sentence(tmp_path, capsys, damage):
    folder = tmp_path / "export"
    export_open_clip(create_model(TINY, seed=4), str(folder))
    weights = folder / state_dict_io.WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    with pytest.raises(ValueError, match=rf"{weights} is truncated or corrupt"):
        create_model(None, f"local-dir:{folder}")
    assert cli.main(["import", "--pretrained", f"local-dir:{folder}", "--output", str(tmp_path / "ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated or corrupt" in err and str(weights) in err, err


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        state_dict_io.read_state_dict(str(tmp_path / "nothing.safetensors"))


_RESTORE_FROM_BUCKET = """
import sys
sys.path.insert(0, {tests!r})
from train_helpers import smoke_config
from bioclip_jax.parallel.mesh import make_mesh
from bioclip_jax.train import checkpointing, state as state_lib

class NoIterator:
    def set_state(self, state):
        pass

config = smoke_config({shards!r})
layout = state_lib.state_layout(config, state_lib.model_skeleton(config), make_mesh(8, 1, 1))
manager = checkpointing.TrainCheckpointer({workdir!r}, 3, 3, async_save=False)
try:
    manager.restore_latest_good(layout, NoIterator())
    print("restored")
except checkpointing.CheckpointError as error:
    print("error:", error)
"""


def test_a_bucket_whose_array_endpoint_does_not_answer_stops_at_the_deadline(gcs_dir, shards, tmp_path):
    """gcsfs answers but tensorstore's endpoint (array reads) takes connections and never replies: the
    old code waited in the metadata read for more than 900 s, printing nothing."""
    import socket
    import time

    from bioclip_jax.parallel.mesh import make_mesh
    from bioclip_jax.train import checkpointing
    from bioclip_jax.train import state as state_lib
    from bioclip_jax.train.loop import initial_params
    from train_helpers import smoke_config

    workdir = f"{gcs_dir}/run"
    config = smoke_config(shards)
    layout = state_lib.state_layout(config, state_lib.model_skeleton(config), make_mesh(8, 1, 1))
    manager = checkpointing.TrainCheckpointer(workdir, 3, 3, async_save=False)
    manager.save(3, state_lib.initial_state(layout, initial_params(config)[0]), _NoIterator(), force=True)
    manager.close()

    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        script = tmp_path / "restore.py"
        script.write_text(_RESTORE_FROM_BUCKET.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                                      shards=shards, workdir=workdir))
        env = {**os.environ, **gcs_env(), "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
               "BIOCLIP_JAX_STORAGE_TIMEOUT_S": "5", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
        started = time.monotonic()
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - started
    lines = [line for line in done.stdout.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stdout + done.stderr[-3000:]
    assert f"checkpoint step 3 in {workdir}/checkpoints did not finish within 5 s" in lines[0]
    assert "left in place" in lines[0] and seconds < 120


class _NoIterator:
    """The data iterator's part of a checkpoint is not under test here."""

    def get_state(self):
        return b"{}"


def test_a_local_log_on_a_file_system_without_locks_is_still_appended_to(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    writer = MetricsWriter(tmp_path, total_steps=10)
    writer.write(1, {"loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}]
