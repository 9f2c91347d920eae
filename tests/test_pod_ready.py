"""A pod run from start to finish, as 2 processes x 4 CPU devices (gloo) on this machine.

The legs of one job (tests/multiprocess_runs.py) end with a launch of the real binary
(launch/local_multiprocess.sh) that trains on a data=2 x fsdp=4 mesh, evaluates on the
held-out species, checkpoints and exports at the end; the leg before it, also 2 processes,
made the periodic evaluation at step 4. The same job as 1 process x 8 devices is the
reference: eval numbers and the exported model must agree. A 1-device process then exports
a step the 2-process run wrote. In-process checks cover sharded initialisation and the
meshes that are refused.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from safetensors.numpy import load_file

from bioclip_jax.checkpoint.model_dir import load_params
from bioclip_jax.exit_codes import STOPPED
from bioclip_jax.parallel import sharding as sharding_lib
from bioclip_jax.parallel.mesh import make_mesh
from bioclip_jax.pretrained import create_model
from bioclip_jax.tokenizer import get_tokenizer
from bioclip_jax.train import state as state_lib
from bioclip_jax.train.job import done_step, run_job
from bioclip_jax.train.loop import initial_params
from bioclip_jax.train.metrics import read_metrics
from multiprocess_runs import (  # noqa: F401 - killed_run, one_process, shared_shards, two_processes are fixtures
    FSDP, JOB, LAUNCH_TIMEOUT, REPO, TENSOR, eval_rows, job_config, killed_run, launcher_command, launcher_env,
    one_process, shared_shards, subprocess_env, two_processes)
from train_helpers import smoke_config


def test_periodic_and_final_eval_across_processes_equal_one_process(two_processes, one_process):
    launched, expected = eval_rows(two_processes), eval_rows(one_process)
    assert sorted(expected) == [2, 4, 5] and sorted(launched) == [4, 5], (launched, expected)
    for step in (4, 5):  # step 4: the killed leg's periodic evaluation; step 5: the last leg's final one
        assert set(launched[step]) == set(expected[step])
        assert any("zero_shot_top1" in k for k in expected[step])
        for key, value in expected[step].items():
            np.testing.assert_allclose(launched[step][key], value, atol=1e-6, err_msg=f"step {step} {key}")


def _embeddings(export_dir) -> tuple[np.ndarray, np.ndarray]:
    model = create_model(None, f"local-dir:{export_dir}")
    size = model.config.vision.image_size
    images = np.random.default_rng(0).normal(size=(4, size, size, 3)).astype(np.float32)
    tokens = get_tokenizer("ViT-B-16", context_length=model.config.text.context_length)(
        ["a photo of Animalia", "a photo of a bird"])
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def test_export_after_fsdp_training_across_processes_equals_one_process(two_processes, one_process):
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        assert (two_processes / "open_clip" / name).is_file()
    for launched, expected in zip(_embeddings(two_processes / "open_clip"), _embeddings(one_process / "open_clip")):
        np.testing.assert_allclose(launched, expected, rtol=1e-4, atol=1e-5)
    assert json.loads((two_processes / "DONE").read_text())["step"] == JOB["total_steps"]


def test_a_one_device_process_exports_a_step_written_by_two_processes(two_processes, tmp_path):
    out = tmp_path / "step4"  # step 4: written by the killed 2-process leg
    result = subprocess.run([sys.executable, "-m", "bioclip_jax.cli.main", "export", "--checkpoint",
                             str(two_processes), "--step", "4", "--out", str(out)],
                            cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    exported = load_file(str(out / "open_clip_model.safetensors"))
    step4 = load_params(str(two_processes), step=4)
    final = load_params(str(two_processes))
    scale = float(np.asarray(step4[("logit_scale",)]))
    np.testing.assert_allclose(float(exported["logit_scale"]), scale, rtol=1e-6)
    assert not np.allclose(scale, float(np.asarray(final[("logit_scale",)]))), "step 4 and 5 should differ"


# ---------------------------------------------------------------------------------- in-process checks


def test_fresh_initialisation_places_each_shard_without_gathering(monkeypatch):
    """Old code: device_put of every whole parameter onto the global sharding (on several
    processes, an equality allgather per parameter). Now: shards only, no device_put."""
    config = smoke_config("unused", mesh__data=2, mesh__fsdp=4)
    mesh = make_mesh(2, 4, 1)
    skeleton = state_lib.model_skeleton(config)
    layout = state_lib.state_layout(config, skeleton, mesh)
    params, _ = initial_params(config)

    def refuse(*args, **kwargs):
        raise AssertionError("initialisation must not device_put (or allgather) whole parameters")

    monkeypatch.setattr(jax, "device_put", refuse)
    monkeypatch.setattr(multihost_utils, "assert_equal", refuse)
    state = state_lib.initial_state(layout, params)
    monkeypatch.undo()

    sharded = 0
    for key, value in state["params"].items():
        expected = layout.shardings["params"][key]
        assert value.sharding.is_equivalent_to(expected, value.ndim), key
        shard_shape = expected.shard_shape(value.shape)
        assert all(s.data.shape == shard_shape for s in value.addressable_shards), key
        sharded += shard_shape != value.shape
        np.testing.assert_array_equal(np.asarray(value), params[key].astype(np.float32))
    assert sharded > 0, "the fsdp mesh should split some parameters"


def test_replicated_batch_axes_across_processes_are_refused(monkeypatch):
    """tensor=8 on 2 processes x 4 devices: both processes would need the same rows."""
    class FakeDevice:  # what check_batch_layout reads of a device: its owner
        def __init__(self, device, process):
            self.device, self.process_index = device, process

    mesh = make_mesh(1, 1, 8)
    real = sharding_lib.batch_sharding
    processes = {d: i // 4 for i, d in enumerate(mesh.devices.flat)}

    class TwoHostSharding:
        def __init__(self, sharding):
            self.sharding = sharding

        def devices_indices_map(self, shape):
            return {FakeDevice(d, processes[d]): idx for d, idx in self.sharding.devices_indices_map(shape).items()}

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "local_device_count", lambda: 4)
    monkeypatch.setattr(sharding_lib, "batch_sharding", lambda m, rules=sharding_lib.LOGICAL_RULES:
                        TwoHostSharding(real(m, rules)))
    with pytest.raises(ValueError, match=r"replicates the batch over \['tensor'\] across processes"):
        sharding_lib.check_batch_layout(mesh)
    sharding_lib.check_batch_layout(make_mesh(2, 4, 1))  # batch split over every axis: accepted


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_the_same_saved_step(shared_shards, tmp_path):
    """JAX's preemption service owns SIGTERM in a multi-process job (no Python handler replaces
    it): a notice to one host reaches all of them, they save the same step and exit 75.
    The fast version is test_train's single-process SIGTERM test."""
    workdir, log_dir = tmp_path / "run", tmp_path / "logs"
    command = launcher_command(workdir, shared_shards, {"total_steps": 500, "checkpoint__every_steps": 1000, **FSDP})
    with open(tmp_path / "launcher.out", "w") as output:
        launcher = subprocess.Popen(command, cwd=REPO, env=launcher_env(log_dir), stdout=output,
                                    stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while len(read_metrics(str(workdir))) < 2:
            assert launcher.poll() is None, (tmp_path / "launcher.out").read_text()
            assert time.time() < deadline, "the 2-process run logged no step in time"
            time.sleep(0.5)
        os.kill(int((log_dir / "process-1.pid").read_text()), signal.SIGTERM)
        returncode = launcher.wait(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    logs = [(log_dir / f"process-{i}.log").read_text() for i in range(2)]
    assert returncode == STOPPED, (tmp_path / "launcher.out").read_text() + "\n".join(logs)
    steps = [set(re.findall(r"Reached preemption sync point, step=(\d+)", log)) for log in logs]
    assert len(steps[0]) == 1 and steps[0] == steps[1], steps
    saved = int(next(iter(steps[0])))
    assert (workdir / "checkpoints" / str(saved)).is_dir() and saved < 500
    assert not (workdir / "open_clip").exists() and not (workdir / "DONE").exists()


def test_a_finished_run_is_marked_done_and_a_rerun_does_nothing(one_process, shared_shards, tmp_path, capsys):
    workdir = tmp_path / "done"  # a copy: the other tests read the reference run at the same time
    shutil.copytree(one_process, workdir)
    assert done_step(workdir) == JOB["total_steps"]
    exported = (workdir / "open_clip" / "open_clip_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert run_job(job_config(shared_shards, TENSOR), str(workdir)) == {}
    assert "nothing to do" in capsys.readouterr().out
    assert (workdir / "open_clip" / "open_clip_model.safetensors").stat().st_mtime_ns == exported
