"""One training job run as a chain of 1-process and 2-process legs, shared by test_multiprocess.py
and test_pod_ready.py (each reads the legs it needs as fixtures).

The job: 5 steps, a checkpoint and a held-out evaluation every 2 steps and at the end, then an
export.

  one_process    the whole job as 1 process x 8 devices (data=2 x tensor=4): the reference
  killed_run     its step-2 checkpoint continued by launch/local_multiprocess.sh as 2 processes
                 x 4 devices (data=2 x tensor=4) until process 1 is SIGKILLed once step 4 is
                 checkpointed
  resumed        1 process x 8 devices picks the killed run up from its latest checkpoint
  two_processes  the launcher's rerun of the killed run (data=2 x fsdp=4) to the end of the job

The data axis spans the two processes on every 2-process leg. Gradient collectives that span
all 8 devices go through gloo slowly (benchmarks/README.md, "Multi-process training over
gloo"), so only the last leg, one step, trains with fsdp across processes. Each leg runs once
per test session: under pytest-xdist the first worker to ask runs it and the others wait for it
and read what it left on disk.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import pytest

from bioclip_jax.train.job import run_job
from bioclip_jax.train.metrics import read_metrics
from train_helpers import losses, make_shards, run, smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
JOB = {"total_steps": 5, "checkpoint__every_steps": 2, "checkpoint__keep": 3, "eval__every_steps": 2}
FSDP = {"mesh__data": 2, "mesh__fsdp": 4}
TENSOR = {"mesh__data": 2, "mesh__tensor": 4}
KILL_AFTER_CHECKPOINT = 4
LAUNCH_TIMEOUT = 420  # seconds; nothing may hang CI


def held_out(shards_dir: str) -> dict:
    root = os.path.dirname(shards_dir)
    return {"eval__held_out_dir": os.path.join(root, "held_out", "images"),
            "eval__taxa_file": os.path.join(root, "held_out", "taxa.csv"), "eval__text_type": "taxon_com,com"}


def job_config(shards_dir: str, mesh: dict):
    return smoke_config(shards_dir, **JOB, **mesh, **held_out(shards_dir))


def flags(overrides: dict) -> list[str]:
    return [f"--config.{key.replace('__', '.')}={value}" for key, value in overrides.items()]


def subprocess_env(devices: int | None = None) -> dict:
    """This environment for a child process; with `devices`, that many simulated CPU devices.
    The child shares the test process's compiled programs."""
    env = dict(os.environ)
    if devices is not None:
        xla_flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
        env.update(XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip(),
                   JAX_PLATFORMS="cpu")
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def launcher_env(log_dir) -> dict:
    return dict(subprocess_env(), PYTHON=sys.executable, LOG_DIR=str(log_dir), KILL_GRACE_SECONDS="3")


def launcher_command(workdir, shards_dir: str, overrides: dict) -> list[str]:
    return ["bash", LAUNCHER, "2", "4", "--", "--config=configs/synthetic_tiny.py:smoke", f"--workdir={workdir}",
            f"--config.data.train_shards={shards_dir}", *flags(overrides)]


def finished_steps(workdir) -> list[int]:
    root = os.path.join(workdir, "checkpoints")
    return sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []


def copy_until_step(source, destination, step: int) -> None:
    """`source` as it was when its run stopped after `step`: later checkpoints, the metrics and
    what only the end of the job writes are left out."""
    shutil.copytree(source, destination, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        "metrics.jsonl", "tensorboard", "DONE", "open_clip", "results.*"))
    for later in finished_steps(destination):
        if later > step:
            shutil.rmtree(os.path.join(destination, "checkpoints", str(later)))


def eval_rows(workdir) -> dict[int, dict]:
    rows: dict[int, dict] = {}
    for record in read_metrics(str(workdir)):
        evals = {k: v for k, v in record.items() if k.startswith("eval/")}
        if evals:
            rows.setdefault(record["step"], {}).update(evals)
    return rows


def by_step(mapping: dict) -> dict[int, float]:
    """A {step: value} mapping read back from JSON, whose keys are text."""
    return {int(step): value for step, value in mapping.items()}


# ------------------------------------------------------------------------ one run per test session


def _session_root(tmp_path_factory) -> Path:
    """A folder every pytest-xdist worker of this test session sees (each worker has its own basetemp)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "multiprocess_runs"


def _once(tmp_path_factory, name: str, make: Callable[[Path], dict]) -> dict:
    """`make(folder)` run by the first worker to ask for `name`; the others wait and read its result."""
    root = _session_root(tmp_path_factory)
    root.mkdir(exist_ok=True)
    folder, result = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not result.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a failed attempt left
            folder.mkdir()
            result.write_text(json.dumps(make(folder)))
    return json.loads(result.read_text())


@pytest.fixture(scope="session")
def shared_shards(tmp_path_factory) -> str:
    """The training shards every leg reads (the same path: a run's config.json records it)."""
    return _once(tmp_path_factory, "synthetic", lambda folder: {"train": make_shards(folder)})["train"]


@pytest.fixture(scope="session")
def one_process(shared_shards, tmp_path_factory) -> Path:
    """The whole job (train, periodic eval, export) as 1 process x 8 devices."""
    def make(folder):
        run_job(job_config(shared_shards, TENSOR), str(folder / "workdir"))
        return {"workdir": str(folder / "workdir")}

    return Path(_once(tmp_path_factory, "one_process", make)["workdir"])


def _kill_leftovers(log_dir, launcher: subprocess.Popen) -> None:
    """Stops the launcher and the processes it started (each leads its own process group)."""
    pids = [launcher.pid] + [int(p.read_text().strip()) for p in Path(log_dir).glob("*.pid")]
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    launcher.wait(timeout=30)


def records_per_step(workdir) -> dict[int, int]:
    """How many metrics.jsonl loss records each step has (only process 0 may write)."""
    counts: dict[int, int] = {}
    for record in read_metrics(str(workdir)):
        if "loss" in record:
            counts[record["step"]] = counts.get(record["step"], 0) + 1
    return counts


@pytest.fixture(scope="session")
def killed_run(one_process, shared_shards, tmp_path_factory) -> dict:
    """The reference's step-2 checkpoint, continued by the launcher as 2 processes x 4 devices
    until process 1 is killed after checkpoint 4 (its workdir as the kill left it)."""
    def make(folder):
        workdir, log_dir = folder / "workdir", folder / "logs"
        log_dir.mkdir()
        copy_until_step(one_process, workdir, 2)
        command = launcher_command(workdir, shared_shards, {**JOB, **TENSOR, **held_out(shared_shards)})
        output_path = log_dir / "launcher.out"
        with open(output_path, "w") as output_file:  # a file, not a pipe: a full pipe would stall the run
            launcher = subprocess.Popen(command, cwd=REPO, env=launcher_env(log_dir), stdout=output_file,
                                        stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + LAUNCH_TIMEOUT
            while KILL_AFTER_CHECKPOINT not in finished_steps(workdir):
                assert launcher.poll() is None, f"launcher ended early:\n{output_path.read_text()}"
                assert time.time() < deadline, "no checkpoint 4 from the 2-process run in time"
                time.sleep(0.2)
            records_before_kill = records_per_step(workdir)
            os.kill(int((log_dir / "process-1.pid").read_text()), signal.SIGKILL)
            killed_at = time.time()
            returncode = launcher.wait(timeout=60)
            seconds_to_exit = time.time() - killed_at
        finally:
            if launcher.poll() is None:
                _kill_leftovers(log_dir, launcher)
        return {"workdir": str(workdir), "returncode": returncode, "seconds_to_exit": seconds_to_exit,
                "output": output_path.read_text(), "counts": records_before_kill, "log_dir": str(log_dir),
                "losses": losses(read_metrics(str(workdir)))}

    result = _once(tmp_path_factory, "killed_run", make)
    return {**result, "counts": by_step(result["counts"]), "losses": by_step(result["losses"])}


@pytest.fixture(scope="session")
def resumed(killed_run, shared_shards, tmp_path_factory) -> dict:
    """1 process x 8 devices picks (a copy of) the killed run up from its latest checkpoint, to the end."""
    def make(folder):
        shutil.copytree(killed_run["workdir"], folder / "workdir")
        latest = finished_steps(folder / "workdir")[-1]
        assert latest < JOB["total_steps"], f"the kill came late (checkpoint {latest})"
        records = run(folder / "workdir", shared_shards, **JOB, **TENSOR)
        return {"latest": latest, "losses": losses(records)}

    result = _once(tmp_path_factory, "resumed", make)
    return {**result, "losses": by_step(result["losses"])}


@pytest.fixture(scope="session")
def two_processes(killed_run, shared_shards, tmp_path_factory) -> Path:
    """The launcher's rerun of (a copy of) the killed run, 2 processes x 4 devices on the fsdp mesh,
    to the end of the job: training, the final evaluation and the export."""
    def make(folder):
        workdir, log_dir = folder / "workdir", folder / "logs"
        shutil.copytree(killed_run["workdir"], workdir)
        log_dir.mkdir()
        command = launcher_command(workdir, shared_shards, {**JOB, **FSDP, **held_out(shared_shards)})
        result = subprocess.run(command, cwd=REPO, env=launcher_env(log_dir), capture_output=True, text=True,
                                timeout=LAUNCH_TIMEOUT)
        logs = "\n".join(p.read_text() for p in sorted(log_dir.glob("process-*.log")))
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{logs}"
        return {"workdir": str(workdir)}

    return Path(_once(tmp_path_factory, "two_processes", make)["workdir"])
