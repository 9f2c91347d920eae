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
import shlex
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


# ----------------------------------------------------------------------------- cluster scripts, offline

FAKE_SRUN = """#!/bin/bash
# srun stand-in: SLURM_NTASKS copies with their own SLURM_LOCALID; forwards TERM like srun.
while [[ $1 == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) SLURM_PROCID=$i "$@" & pids+=($!); done
signals=0
trap 'signals=$((signals + 1)); kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
  while true; do before=$signals; wait "$pid"; code=$?; ((before == signals)) && break; done
  ((code)) && status=$code
done
exit $status
"""
FAKE_PYTHON = """#!/bin/bash
# python stand-in: records what a training process was given; with FAKE_RUN_SECONDS, runs until TERM.
out="$FAKE_DIR/task-$SLURM_PROCID"
printf '%s\\n' "devices=$JAX_LOCAL_DEVICE_IDS" "$@" > "$out"
if [[ -n ${FAKE_RUN_SECONDS:-} ]]; then
  sleep "$FAKE_RUN_SECONDS" &
  trap 'kill $!; echo saved >> "$out"; exit 0' TERM
  wait $!
fi
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" > "$FAKE_DIR/scontrol"
"""


@pytest.fixture()
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("python", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(bin_dir / "python"), FAKE_DIR=str(tmp_path),
               SLURM_JOB_ID="5", SLURM_GPUS_ON_NODE="4")
    return tmp_path, env


SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
TRAIN_ARGS = ["--config=configs/bioclip_vitb16.py", "--workdir=/shared/run one",
              "--config.data.train_shards=/d/shard-{000000..000165}.tar"]


@pytest.mark.parametrize("nodes, tasks_per_node, devices", [
    (1, 4, ["0", "1", "2", "3"]),      # one process per GPU
    (2, 1, ["0,1,2,3", "0,1,2,3"]),    # one process per node drives all its GPUs
])
def test_slurm_script_gives_each_process_its_gpus_and_the_arguments(fake_slurm, nodes, tasks_per_node, devices):
    directory, env = fake_slurm
    env.update(SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(tasks_per_node),
               SLURM_NTASKS=str(nodes * tasks_per_node))
    result = subprocess.run(["bash", SBATCH, *TRAIN_ARGS], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank, expected in enumerate(devices):
        lines = (directory / f"task-{rank}").read_text().splitlines()
        assert lines == [f"devices={expected}", "-u", "-m", "bioclip_jax.train", *TRAIN_ARGS]
    assert not (directory / "scontrol").exists()


def test_slurm_script_saves_and_requeues_before_the_time_limit(fake_slurm):
    directory, env = fake_slurm
    env.update(SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="4", SLURM_NTASKS="4", FAKE_RUN_SECONDS="60")
    job = subprocess.Popen(["bash", SBATCH, *TRAIN_ARGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    try:
        deadline = time.time() + 30
        while len(list(directory.glob("task-*"))) < 4 and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        job.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@300` sends
        output, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output
    assert all((directory / f"task-{rank}").read_text().endswith("saved\n") for rank in range(4))
    assert (directory / "scontrol").read_text().split() == ["requeue", "5"]


def test_slurm_script_rejects_a_task_layout_it_cannot_map(fake_slurm):
    _, env = fake_slurm
    env.update(SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="3", SLURM_NTASKS="3")
    result = subprocess.run(["bash", SBATCH, *TRAIN_ARGS], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "ntasks-per-node=3" in result.stderr


def test_tpu_pod_dry_run_starts_the_same_command_on_every_worker(tmp_path):
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "--tpu", "pod", "--zone", "z",
                             "--project", "p", "--run-name", "r1", "--dry-run", "--", *TRAIN_ARGS],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line[2:]) for line in result.stderr.splitlines() if line.startswith("+ ")]
    assert [c[:4] for c in commands[1:]] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 3
    assert [c[4] for c in commands[1:]] == ["scp", "ssh", "ssh"]
    assert all("--worker=all" in c for c in commands[1:])
    remote = shlex.split(commands[-1][commands[-1].index("--command") + 1])
    start = remote.index("BIOCLIP_JAX_DISTRIBUTED=1")
    assert remote[start + 1:start + 5] == ["python3", "-u", "-m", "bioclip_jax.train"]
    assert remote[start + 5:start + 5 + len(TRAIN_ARGS)] == TRAIN_ARGS
