"""The real multi-host code path on one machine: launch/local_multiprocess.sh, gloo CPU collectives.

The legs of one job (tests/multiprocess_runs.py) serve several checks: a 1-process x 8-device
run's step-2 checkpoint is continued as 2 processes x 4 devices, process 1 is SIGKILLed once
step 4 is checkpointed, and 1 process x 8 devices resumes from the latest checkpoint. Every
logged loss must equal the uninterrupted 1 x 8 run's. The 2-process leg's mesh is data=2 x
tensor=4: the data axis spans the two processes, and the gradient all-reduce over gloo stays
small enough for a test.
"""

import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from bioclip_jax.train.distributed import launched_as_multiprocess, maybe_initialize_distributed
from bioclip_jax.train.metrics import read_metrics
from multiprocess_runs import (  # noqa: F401 - killed_run, one_process, resumed, shared_shards are fixtures
    JOB, KILL_AFTER_CHECKPOINT, LAUNCH_TIMEOUT, LAUNCHER, REPO, TENSOR, copy_until_step, finished_steps,
    killed_run, launcher_env, one_process, resumed, shared_shards, subprocess_env)
from train_helpers import losses


def _live_pids(log_dir):
    for name in os.listdir(log_dir):
        if name.endswith(".pid"):
            with open(os.path.join(log_dir, name)) as f:
                pid = int(f.read())
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            yield pid


def test_launcher_exits_promptly_and_nonzero_when_a_process_dies(killed_run):
    assert killed_run["returncode"] == 128 + signal.SIGKILL, killed_run["output"]
    assert killed_run["seconds_to_exit"] < 30
    assert "process 1" in killed_run["output"] and "stopping the others" in killed_run["output"]
    assert not [p for p in _live_pids(killed_run["log_dir"])], "launcher left processes running"


def test_only_process_zero_writes_metrics(killed_run):
    counts = killed_run["counts"]
    assert {3, 4} <= set(counts)
    assert all(counts[step] == 1 for step in counts), counts


def test_two_processes_give_the_losses_of_one(killed_run, one_process):
    launched, expected = killed_run["losses"], losses(read_metrics(str(one_process)))
    for step in (3, 4):  # computed by 2 processes x 4 devices, resumed from a 1 x 8 checkpoint
        np.testing.assert_allclose(launched[step], expected[step], rtol=1e-5, err_msg=f"step {step}")


def test_rerun_resumes_from_the_last_checkpoint_on_the_other_layout(resumed, one_process):
    latest, after, expected = resumed["latest"], resumed["losses"], losses(read_metrics(str(one_process)))
    assert latest >= KILL_AFTER_CHECKPOINT
    for step in range(latest + 1, JOB["total_steps"] + 1):
        np.testing.assert_allclose(after[step], expected[step], rtol=1e-5, err_msg=f"step {step}")


def test_launcher_rejects_bad_arguments(tmp_path):
    for args in (["0", "4", "--", "x"], ["2", "four", "--", "x"], ["2", "4", "x"]):
        result = subprocess.run(["bash", LAUNCHER, *args], cwd=REPO, env=launcher_env(tmp_path),
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, args
        assert "error:" in result.stderr or "usage" in result.stderr.lower(), result.stderr


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"JAX_NUM_PROCESSES": "1"}, False),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1", "JAX_COORDINATOR_ADDRESS": "h:1"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_STEP_NODELIST": "n[1-2]"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"}, False),  # inside sbatch but not under srun
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, True),
    ({"BIOCLIP_JAX_DISTRIBUTED": "1"}, True),
    ({"BIOCLIP_JAX_DISTRIBUTED": "0", "JAX_NUM_PROCESSES": "4"}, False),
])
def test_multiprocess_detection(env, expected):
    assert launched_as_multiprocess(env) is expected


def test_bad_process_variables_are_clear_errors():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        launched_as_multiprocess({"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="JAX_PROCESS_ID.*missing"):
        maybe_initialize_distributed({"JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"})



# ----------------------------------------------------------------------------- one verdict per checkpoint

_RESTORE = """
import os, sys
from bioclip_jax.train.distributed import maybe_initialize_distributed
maybe_initialize_distributed()
import jax
sys.path.insert(0, {tests!r})
from train_helpers import smoke_config
from bioclip_jax.checkpoint import faults
from bioclip_jax.parallel.mesh import make_mesh
from bioclip_jax.train import checkpointing, state as state_lib

if os.environ.get("STORAGE_FAULT") == str(jax.process_index()):  # this host's reads fail, as on a bad link
    import orbax.checkpoint as ocp
    faults.RETRY_DELAYS_S = (0.0, 0.0)
    def unavailable(*args, **kwargs):
        raise ValueError("UNAVAILABLE: connection reset by peer")
    ocp.StandardCheckpointHandler.restore = unavailable

class NoIterator:
    def set_state(self, state):
        pass

config = smoke_config({shards!r}, **{overrides!r})
layout = state_lib.state_layout(config, state_lib.model_skeleton(config), make_mesh(2, 1, 4))
manager = checkpointing.TrainCheckpointer(sys.argv[1 + jax.process_index()], 2, 3, async_save=False)
try:
    step, _ = manager.restore_latest_good(layout, NoIterator())
    print("restored", step, flush=True)
except checkpointing.CheckpointError as error:
    print("error:", error, flush=True)
manager.close()
"""


def _restore_in_two_processes(workdirs, shards, tmp_path, fault_on: str = "") -> list[str]:
    """Each of 2 processes (4 devices each) restores the latest good checkpoint of its own view of the
    workdir (`workdirs[i]`); returns the last line each printed."""
    script = tmp_path / "restore.py"
    script.write_text(_RESTORE.format(tests=os.path.dirname(os.path.abspath(__file__)), shards=shards,
                                      overrides={**JOB, **TENSOR}))
    port = _free_port()
    processes = []
    for index in range(2):
        env = dict(subprocess_env(), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(index), XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   STORAGE_FAULT=fault_on)
        processes.append(subprocess.Popen([sys.executable, str(script), *map(str, workdirs)], env=env, cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
            outputs.append(output)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    lines = [output.strip().splitlines()[-1] if output.strip() else "" for output in outputs]
    assert all(line.startswith(("restored", "error:")) for line in lines), "\n---\n".join(outputs)
    return lines


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_views(one_process, tmp_path, damaged_on: int | None = None):
    """A copy of the reference workdir per process (the storage as each host sees it)."""
    views = []
    for index in range(2):
        view = tmp_path / f"view{index}"
        copy_until_step(one_process, view, JOB["total_steps"])
        views.append(view)
    latest = finished_steps(views[0])[-1]
    if damaged_on is not None:
        for data in (views[damaged_on] / "checkpoints" / str(latest) / "params").rglob("*"):
            if data.is_file() and data.stat().st_size > 10_000:
                with open(data, "r+b") as f:  # cut short, as a bad cache on one host serves it
                    f.truncate(data.stat().st_size // 2)
    return views, latest


def test_a_checkpoint_damaged_on_one_host_only_is_set_aside_by_all(one_process, shared_shards, tmp_path):
    """Only process 1 sees the newest checkpoint damaged: both agree it is, process 0 moves it aside
    and both resume from the previous one (the old code left the processes at different barriers)."""
    views, latest = _own_views(one_process, tmp_path, damaged_on=1)
    lines = _restore_in_two_processes(views, shared_shards, tmp_path)
    previous = finished_steps(views[1])[-2]
    assert lines == [f"restored {previous}", f"restored {previous}"]
    assert [p.name.split("-")[0] for p in (views[0] / "checkpoints_unreadable").iterdir()] == [str(latest)]


def test_a_storage_fault_on_one_host_stops_every_process_and_moves_nothing(one_process, shared_shards, tmp_path):
    views, latest = _own_views(one_process, tmp_path)
    lines = _restore_in_two_processes(views, shared_shards, tmp_path, fault_on="1")
    assert lines[0] == lines[1] and "UNAVAILABLE" in lines[0] and "on process 1" in lines[0], lines
    assert f"checkpoint step {latest}" in lines[0] and "left in place" in lines[0]
    assert not (views[0] / "checkpoints_unreadable").exists() and latest in finished_steps(views[0])
