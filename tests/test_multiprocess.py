"""The real multi-host code path on one machine: launch/local_multiprocess.sh, gloo CPU collectives.

One launch serves several checks. The launcher resumes a 1-process x 8-device run's
step-2 checkpoint as 2 processes x 4 devices; process 1 is SIGKILLed once step 4 is
checkpointed; 1 process x 8 devices resumes from the latest checkpoint. Every logged
loss must equal the uninterrupted 1 x 8 run's. The mesh is data=2 x tensor=4 on both
layouts: the data axis then spans the two processes, and the gradient all-reduce over
gloo stays small enough for a test (data=8 over gloo takes ~30 s a step on 2 cores).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bioclip_jax.train.distributed import launched_as_multiprocess, maybe_initialize_distributed
from bioclip_jax.train.metrics import read_metrics
from train_helpers import losses, run, shards  # noqa: F401 - shards is a fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
TOTAL_STEPS = 40       # a long schedule: the launched run is surely still going when it is killed
KILL_AFTER_CHECKPOINT = 4
REFERENCE_STEPS = 8
MESH = {"mesh__data": 2, "mesh__tensor": 4}
LAUNCH_TIMEOUT = 240   # seconds; nothing may hang CI


def _overrides(**extra):
    return {"total_steps": TOTAL_STEPS, "checkpoint__every_steps": 2, **MESH, **extra}


def _launcher_env(log_dir) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(log_dir), KILL_GRACE_SECONDS="3")
    cache = jax.config.jax_compilation_cache_dir  # share compiled programs with the test process
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _kill_leftovers(log_dir, launcher: subprocess.Popen) -> None:
    """Stops the launcher and the processes it started (each leads its own process group)."""
    pids = [launcher.pid]
    for name in os.listdir(log_dir):
        if name.endswith(".pid"):
            with open(os.path.join(log_dir, name)) as f:
                pids.append(int(f.read().strip()))
    for pid in pids:
        for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
    launcher.wait(timeout=30)


def _finished_steps(workdir) -> list[int]:
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def _records_per_step(workdir) -> dict[int, int]:
    """How many metrics.jsonl records each step has (only process 0 may write)."""
    counts: dict[int, int] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                counts[record["step"]] = counts.get(record["step"], 0) + 1
    return counts


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


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted 1 process x 8 devices run, checkpointed every 2 steps."""
    workdir = tmp_path_factory.mktemp("reference")
    return workdir, losses(run(workdir, shards, stop_after=REFERENCE_STEPS, **_overrides()))


def _copy_until_step(source, destination, step: int) -> None:
    """A workdir as it was when its run stopped after `step` (checkpoints beyond it dropped)."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("metrics.jsonl", "tensorboard"),
                    dirs_exist_ok=True)
    for later in _finished_steps(destination):
        if later > step:
            shutil.rmtree(os.path.join(destination, "checkpoints", str(later)))


@pytest.fixture(scope="module")
def killed_run(reference, shards, tmp_path_factory):
    """The reference's step-2 checkpoint, continued by the launcher as 2 processes x 4 devices
    until process 1 is killed after checkpoint 4."""
    workdir = tmp_path_factory.mktemp("multiprocess")
    log_dir = tmp_path_factory.mktemp("launcher_logs")
    _copy_until_step(reference[0], workdir, 2)
    command = ["bash", LAUNCHER, "2", "4", "--", "--config=configs/synthetic_tiny.py:smoke",
               f"--workdir={workdir}", f"--config.data.train_shards={shards}",
               f"--config.total_steps={TOTAL_STEPS}", "--config.checkpoint.every_steps=2",
               "--config.mesh.data=2", "--config.mesh.tensor=4"]
    output_path = log_dir / "launcher.out"
    with open(output_path, "w") as output_file:  # a file, not a pipe: a full pipe would stall the run
        launcher = subprocess.Popen(command, cwd=REPO, env=_launcher_env(log_dir), stdout=output_file,
                                    stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + LAUNCH_TIMEOUT
        while KILL_AFTER_CHECKPOINT not in _finished_steps(workdir):
            assert launcher.poll() is None, f"launcher ended early:\n{output_path.read_text()}"
            assert time.time() < deadline, "no checkpoint 4 from the 2-process run in time"
            time.sleep(0.2)
        records_before_kill = _records_per_step(workdir)
        with open(log_dir / "process-1.pid") as f:
            os.kill(int(f.read()), signal.SIGKILL)
        killed_at = time.time()
        returncode = launcher.wait(timeout=60)
        seconds_to_exit = time.time() - killed_at
    finally:
        if launcher.poll() is None:
            _kill_leftovers(log_dir, launcher)
    return {"workdir": workdir, "returncode": returncode, "seconds_to_exit": seconds_to_exit,
            "output": output_path.read_text(), "counts": records_before_kill, "log_dir": log_dir,
            "losses": losses(read_metrics(str(workdir)))}


@pytest.fixture(scope="module")
def resumed(killed_run, shards):
    """1 process x 8 devices picks the killed run up from its latest checkpoint."""
    latest = _finished_steps(killed_run["workdir"])[-1]
    assert latest + 2 <= REFERENCE_STEPS, f"the kill came late (checkpoint {latest})"
    return latest, losses(run(killed_run["workdir"], shards, stop_after=latest + 2, **_overrides()))


def test_launcher_exits_promptly_and_nonzero_when_a_process_dies(killed_run):
    assert killed_run["returncode"] == 128 + signal.SIGKILL, killed_run["output"]
    assert killed_run["seconds_to_exit"] < 30
    assert "process 1" in killed_run["output"] and "stopping the others" in killed_run["output"]
    assert not [p for p in _live_pids(killed_run["log_dir"])], "launcher left processes running"


def test_only_process_zero_writes_metrics(killed_run):
    counts = killed_run["counts"]
    assert {3, 4} <= set(counts)
    assert all(counts[step] == 1 for step in counts), counts


def test_two_processes_give_the_losses_of_one(killed_run, reference):
    launched, expected = killed_run["losses"], reference[1]
    for step in (3, 4):  # computed by 2 processes x 4 devices, resumed from a 1 x 8 checkpoint
        np.testing.assert_allclose(launched[step], expected[step], rtol=1e-5, err_msg=f"step {step}")


def test_rerun_resumes_from_the_last_checkpoint_on_the_other_layout(resumed, reference):
    latest, after = resumed
    assert latest >= KILL_AFTER_CHECKPOINT
    for step in (latest + 1, latest + 2):
        np.testing.assert_allclose(after[step], reference[1][step], rtol=1e-5, err_msg=f"step {step}")


def test_launcher_rejects_bad_arguments(tmp_path):
    for args in (["0", "4", "--", "x"], ["2", "four", "--", "x"], ["2", "4", "x"]):
        result = subprocess.run(["bash", LAUNCHER, *args], cwd=REPO, env=_launcher_env(tmp_path),
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
                                      overrides=_overrides()))
    port = _free_port()
    processes = []
    for index in range(2):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
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
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_views(reference, tmp_path, damaged_on: int | None = None):
    """A copy of the reference workdir per process (the storage as each host sees it)."""
    views = []
    for index in range(2):
        view = tmp_path / f"view{index}"
        _copy_until_step(reference[0], view, REFERENCE_STEPS)
        views.append(view)
    latest = _finished_steps(views[0])[-1]
    if damaged_on is not None:
        for data in (views[damaged_on] / "checkpoints" / str(latest) / "params").rglob("*"):
            if data.is_file() and data.stat().st_size > 10_000:
                with open(data, "r+b") as f:  # cut short, as a bad cache on one host serves it
                    f.truncate(data.stat().st_size // 2)
    return views, latest


def test_a_checkpoint_damaged_on_one_host_only_is_set_aside_by_all(reference, shards, tmp_path):
    """Only process 1 sees the newest checkpoint damaged: both agree it is, process 0 moves it aside
    and both resume from the previous one (the old code left the processes at different barriers)."""
    views, latest = _own_views(reference, tmp_path, damaged_on=1)
    lines = _restore_in_two_processes(views, shards, tmp_path)
    previous = _finished_steps(views[1])[-2]
    assert lines == [f"restored {previous}", f"restored {previous}"]
    assert [p.name.split("-")[0] for p in (views[0] / "checkpoints_unreadable").iterdir()] == [str(latest)]


def test_a_storage_fault_on_one_host_stops_every_process_and_moves_nothing(reference, shards, tmp_path):
    views, latest = _own_views(reference, tmp_path)
    lines = _restore_in_two_processes(views, shards, tmp_path, fault_on="1")
    assert lines[0] == lines[1] and "UNAVAILABLE" in lines[0] and "on process 1" in lines[0], lines
    assert f"checkpoint step {latest}" in lines[0] and "left in place" in lines[0]
    assert not (views[0] / "checkpoints_unreadable").exists() and latest in _finished_steps(views[0])
