"""The launch scripts, offline: launch/slurm_gpu.sbatch, launch/tpu_pod.sh, launch/local_multiprocess.sh.

Stand-ins replace what is not here: `srun`, `scontrol` and the training process for
SLURM; gcloud is never called (--dry-run prints its commands, and the commands meant for
a TPU worker run here, in a temporary HOME, with a stand-in train module); a stand-in
python for the local launcher. The exit statuses are those of bioclip_jax/exit_codes.py.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import uuid

import pytest

from bioclip_jax import exit_codes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
TPU_POD = os.path.join(REPO, "launch", "tpu_pod.sh")
LAUNCHER = os.path.join(REPO, "launch", "local_multiprocess.sh")
STOPPED = exit_codes.STOPPED
TRAIN_ARGS = ["--config=configs/bioclip_vitb16.py", "--workdir=/shared/run one",
              "--config.data.train_shards=/d/shard-{000000..000165}.tar"]
SLURM_XLA_DEFAULTS = ["--xla_gpu_enable_latency_hiding_scheduler=true",
                      "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
                      "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
                      "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
                      "--xla_gpu_enable_triton_gemm=false"]


def _wait_for(condition, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ----------------------------------------------------------------------------- SLURM

FAKE_SRUN = """#!/bin/bash
# srun stand-in: records its options; SLURM_NTASKS copies with their own SLURM_LOCALID;
# forwards TERM like srun; returns the highest task status, like srun.
options=()
while [[ $1 == --* ]]; do options+=("$1"); shift; done
printf '%s\\n' "${options[@]}" > "$FAKE_DIR/srun-options"
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_LOCALID=$((i % SLURM_NTASKS_PER_NODE)) SLURM_PROCID=$i "$@" & pids+=($!)
done
signals=0
trap 'signals=$((signals + 1)); kill -TERM "${pids[@]}" 2>/dev/null' TERM
status=0
for pid in "${pids[@]}"; do
  while true; do before=$signals; wait "$pid"; code=$?; ((before == signals)) && break; done
  ((code > status)) && status=$code
done
exit $status
"""
FAKE_PYTHON = """#!/bin/bash
# python stand-in for a training task: records its GPUs, arguments and environment.
# With FAKE_RUN_SECONDS it runs until SIGTERM, then saves and exits 75 as the train binary
# does; it exits FAKE_EXIT (default 0) when it ends on its own.
out="$FAKE_DIR/task-$SLURM_PROCID"
printf '%s\\n' "devices=$JAX_LOCAL_DEVICE_IDS" "$@" > "$out"
printf '%s\\n' "XLA_FLAGS=$XLA_FLAGS" "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION" \\
  "NCCL_DEBUG=$NCCL_DEBUG" > "$out.env"
if [[ -n ${FAKE_RUN_SECONDS:-} ]]; then
  sleep "$FAKE_RUN_SECONDS" &
  trap 'kill $!; echo saved >> "$out"; exit 75' TERM
  wait $!
fi
exit "${FAKE_EXIT:-0}"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scontrol"
"""


@pytest.fixture()
def fake_slurm(tmp_path):
    """(directory, environment) for running the sbatch script as a 1-node, 4-GPU job 5."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("python", FAKE_PYTHON), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "CUDA_VISIBLE", "XLA_", "NCCL_", "TASK_EXIT_WAIT"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", PYTHON=str(bin_dir / "python"), FAKE_DIR=str(tmp_path),
               SLURM_JOB_ID="5", SLURM_GPUS_ON_NODE="4", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="4",
               SLURM_NTASKS="4")
    return tmp_path, env


def _sbatch(env, *args):
    return subprocess.run(["bash", SBATCH, *(args or TRAIN_ARGS)], env=env, capture_output=True, text=True,
                          timeout=60)


def _task_args(directory, rank=0):
    return (directory / f"task-{rank}").read_text().splitlines()[1:]


def _task_env(directory, rank=0):
    return dict(line.split("=", 1) for line in (directory / f"task-{rank}.env").read_text().splitlines())


def _requeues(directory):
    path = directory / "scontrol"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("nodes, tasks_per_node, devices", [
    (1, 4, ["0", "1", "2", "3"]),      # one process per GPU
    (2, 1, ["0,1,2,3", "0,1,2,3"]),    # one process per node drives all its GPUs
])
def test_slurm_script_gives_each_process_its_gpus_and_the_arguments(fake_slurm, nodes, tasks_per_node, devices):
    directory, env = fake_slurm
    env.update(SLURM_NNODES=str(nodes), SLURM_NTASKS_PER_NODE=str(tasks_per_node),
               SLURM_NTASKS=str(nodes * tasks_per_node))
    result = _sbatch(env)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank, expected in enumerate(devices):
        lines = (directory / f"task-{rank}").read_text().splitlines()
        assert lines == [f"devices={expected}", "-u", "-m", "bioclip_jax.train", *TRAIN_ARGS]
    assert _requeues(directory) == []


def _start_and_signal(env, directory, signum):
    """Starts the job with tasks that run until SIGTERM, sends `signum` to the batch script."""
    env.update(FAKE_RUN_SECONDS="60")
    job = subprocess.Popen(["bash", SBATCH, *TRAIN_ARGS], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(list(directory.glob("task-?"))) == 4, what="4 tasks")
        time.sleep(0.5)
        job.send_signal(signum)
        output, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert all(_task_args(directory, rank)[-1] == "saved" for rank in range(4)), output
    return job.returncode, output


def test_slurm_script_saves_and_requeues_once_before_the_time_limit(fake_slurm):
    """USR1 (what `--signal=B:USR1@300` sends) -> SIGTERM to every task -> 75 -> one requeue."""
    directory, env = fake_slurm
    returncode, output = _start_and_signal(env, directory, signal.SIGUSR1)
    assert returncode == STOPPED, output
    assert _requeues(directory) == ["requeue 5"], output


def test_slurm_script_does_not_requeue_itself_when_slurm_ends_the_job(fake_slurm):
    """SIGTERM to the batch script is scancel or preemption: save, exit 75, no requeue of our own."""
    directory, env = fake_slurm
    returncode, output = _start_and_signal(env, directory, signal.SIGTERM)
    assert returncode == STOPPED, output
    assert _requeues(directory) == [], output


@pytest.mark.parametrize("task_status, requeues", [
    (exit_codes.FINISHED, []),
    (exit_codes.ERROR, []),
    (STOPPED, ["requeue 5"]),  # the tasks were stopped directly (scancel --signal=TERM): resume
])
def test_slurm_script_exits_with_the_training_status(fake_slurm, task_status, requeues):
    directory, env = fake_slurm
    env.update(FAKE_EXIT=str(task_status))
    result = _sbatch(env)
    assert result.returncode == task_status, result.stdout + result.stderr
    assert _requeues(directory) == requeues


def test_slurm_script_lets_the_other_tasks_end_after_one_stops(fake_slurm):
    """A task exiting 75 is no failure: srun must not kill the others (and report a signal)."""
    directory, env = fake_slurm
    assert _sbatch(env).returncode == 0
    options = (directory / "srun-options").read_text().splitlines()
    assert "--kill-on-bad-exit=0" in options
    assert any(re.fullmatch(r"--wait=\d+", option) for option in options), options


@pytest.mark.parametrize("cpus, workers", [("12", 11), ("3", 2), ("1", 0)])
def test_slurm_script_sets_data_workers_from_the_cpus_per_task(fake_slurm, cpus, workers):
    directory, env = fake_slurm
    env.update(SLURM_CPUS_PER_TASK=cpus)
    assert _sbatch(env).returncode == 0
    for rank in range(4):
        assert _task_args(directory, rank) == ["-u", "-m", "bioclip_jax.train", *TRAIN_ARGS,
                                               f"--config.data.workers={workers}"]


@pytest.mark.parametrize("given", [["--config.data.workers=3"], ["--config.data.workers", "3"]])
def test_slurm_script_keeps_data_workers_given_by_the_user(fake_slurm, given):
    directory, env = fake_slurm
    env.update(SLURM_CPUS_PER_TASK="12")
    assert _sbatch(env, *TRAIN_ARGS, *given).returncode == 0
    assert _task_args(directory) == ["-u", "-m", "bioclip_jax.train", *TRAIN_ARGS, *given]


def test_slurm_script_sets_xla_and_nccl_defaults(fake_slurm):
    directory, env = fake_slurm
    assert _sbatch(env).returncode == 0
    task_env = _task_env(directory)
    assert task_env["XLA_FLAGS"].split() == SLURM_XLA_DEFAULTS
    assert task_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
    assert task_env["NCCL_DEBUG"] == "WARN"


def test_slurm_script_keeps_the_users_xla_and_nccl_settings(fake_slurm):
    directory, env = fake_slurm
    user_flags = ["--xla_gpu_enable_latency_hiding_scheduler=false", "--xla_dump_to=/tmp/dump",
                  "--xla_gpu_all_gather_combine_threshold_bytes"]  # a flag without a value counts too
    env.update(XLA_FLAGS=" ".join(user_flags), XLA_PYTHON_CLIENT_MEM_FRACTION="0.7", NCCL_DEBUG="INFO")
    assert _sbatch(env).returncode == 0
    task_env = _task_env(directory)
    flags = task_env["XLA_FLAGS"].split()
    assert flags[:3] == user_flags
    assert sorted(flags[3:]) == sorted(SLURM_XLA_DEFAULTS[1:2] + SLURM_XLA_DEFAULTS[3:])
    assert task_env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.7" and task_env["NCCL_DEBUG"] == "INFO"


def test_slurm_xla_flags_exist_in_the_installed_jaxlib(fake_slurm):
    """XLA aborts on an unknown flag, on any backend: a renamed or removed flag fails here."""
    directory, env = fake_slurm
    assert _sbatch(env).returncode == 0
    flags = _task_env(directory)["XLA_FLAGS"]
    check_env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
                            env=check_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_slurm_script_rejects_a_task_layout_it_cannot_map(fake_slurm):
    _, env = fake_slurm
    env.update(SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="3", SLURM_NTASKS="3")
    result = _sbatch(env)
    assert result.returncode == 2 and "ntasks-per-node=3" in result.stderr


# ----------------------------------------------------------------------------- TPU pod

def _dry_run(*args, env=None):
    """The gcloud commands that `tpu_pod.sh ... --dry-run` prints, as argument lists."""
    result = subprocess.run(["bash", TPU_POD, "--tpu", "pod", "--zone", "z", "--project", "p", "--dry-run", *args],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stderr.splitlines() if line.startswith("+ ")], result.stderr


def _remote(command):
    return command[command.index("--command") + 1]


def test_tpu_pod_dry_run_starts_the_same_detached_command_on_every_worker():
    commands, _ = _dry_run("--run-name", "r1", "--", *TRAIN_ARGS)
    assert commands[0][0] == "tar"
    assert [c[:4] for c in commands[1:]] == [["gcloud", "compute", "tpus", "tpu-vm"]] * 4
    assert [c[4] for c in commands[1:]] == ["scp", "ssh", "ssh", "ssh"]  # copy, install, start, follow
    assert all("--worker=all" in c for c in commands[1:4])
    assert "--worker=0" in commands[4]                                    # follows worker 0's log
    start = shlex.split(_remote(commands[3]))
    # setsid + nohup: the run leaves the ssh session's process group and ignores its hangup
    launch = start.index("setsid")
    assert start[launch:launch + 4] == ["setsid", "nohup", "bash", "-c"]
    assert start[launch + 5:launch + 7] == [">>", "$f.log"]
    assert "f=$HOME/bioclip_jax_logs/r1;" in start
    train = shlex.split(start[launch + 4])
    begin = train.index("BIOCLIP_JAX_DISTRIBUTED=1")
    assert train[begin + 1:begin + 7] == ["python3", "-X", "bioclip_jax_run=r1", "-u", "-m", "bioclip_jax.train"]
    assert train[begin + 7:begin + 7 + len(TRAIN_ARGS)] == TRAIN_ARGS
    assert "$HOME/bioclip_jax_logs/r1.status" in start[launch + 4]       # the run's exit status is kept


def _pinned_version():
    text = open(TPU_POD).read()
    return re.search(r"^JAX_VERSION=\$\{JAX_VERSION:-([0-9.]+)\}$", text, re.M).group(1)


def test_tpu_pod_installs_the_pinned_jax_release():
    version = _pinned_version()
    commands, _ = _dry_run("--run-name", "r1", "--detach", "--", *TRAIN_ARGS)
    assert f"'jax[tpu]=={version}'" in _remote(commands[2])
    env = dict(os.environ, JAX_VERSION="0.9.9")
    commands, _ = _dry_run("--run-name", "r1", "--detach", "--", *TRAIN_ARGS, env=env)
    assert "'jax[tpu]==0.9.9'" in _remote(commands[2])


def test_tpu_pod_stop_and_logs_act_on_every_worker_and_one():
    (stop,), _ = _dry_run("--run-name", "r.1", "--stop")
    assert stop[4:6] == ["ssh", "pod"] and "--worker=all" in stop
    remote = _remote(stop)
    assert "pkill -TERM -f \"$p\"" in remote and "pkill -KILL -g" in remote
    assert "p='^[^ ]+ -X bioclip_jax_run=r\\.1 -u -m bioclip_jax\\.train( |$)';" in remote
    (logs,), _ = _dry_run("--run-name", "r.1", "--logs", "--worker", "3")
    assert "--worker=3" in logs and "tail -n 100 -f --pid=" in _remote(logs)


def test_tpu_pod_stop_pattern_matches_only_the_runs_main_process():
    (stop,), _ = _dry_run("--run-name", "r.1", "--stop")
    pattern = re.search(r"p='([^']+)'", _remote(stop)).group(1)
    matches = lambda line: re.search(pattern, line) is not None  # noqa: E731 - pkill -f: extended regex
    assert matches("/opt/venv/bin/python -X bioclip_jax_run=r.1 -u -m bioclip_jax.train --config=c.py")
    assert matches("python3 -X bioclip_jax_run=r.1 -u -m bioclip_jax.train")
    assert not matches("python3 -X bioclip_jax_run=r.10 -u -m bioclip_jax.train --config=c.py")  # another run
    assert not matches("python3 -X bioclip_jax_run=rx1 -u -m bioclip_jax.train")                 # '.' is literal
    assert not matches("python3 -X bioclip_jax_run=r.1 -c from multiprocessing.spawn import spawn_main")  # Grain
    assert not matches("bash -c BIOCLIP_JAX_DISTRIBUTED=1 python3 -X bioclip_jax_run=r.1 -u -m bioclip_jax.train")
    assert not matches("bash -c p='^[^ ]+ -X bioclip_jax_run=r\\.1 -u -m bioclip_jax\\.train( |$)'; pkill")


def test_tpu_pod_rejects_incomplete_requests():
    for args in (["--stop"], ["--logs"], ["--run-name", "r1", "--stop", "--", "--workdir=x"],
                 ["--run-name", "a b", "--", "--workdir=x"], ["--", "--config=c.py"]):
        result = subprocess.run(["bash", TPU_POD, "--tpu", "t", "--zone", "z", "--project", "p", "--dry-run", *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "error:" in result.stderr, args


FAKE_TRAIN_MODULE = """
import os, signal, sys, time
print("fake train", sys._xoptions.get("bioclip_jax_run"), sys.argv[1:], flush=True)
stop = []
signal.signal(signal.SIGTERM, (signal.SIG_IGN if os.environ.get("FAKE_IGNORE_TERM") else lambda *a: stop.append(1)))
deadline = time.time() + 60
while not stop and time.time() < deadline:
    time.sleep(0.05)
print("saved a checkpoint" if stop else "finished", flush=True)
sys.exit(75 if stop else 0)
"""


@pytest.fixture()
def worker_home(tmp_path):
    """A TPU worker's home here: ~/bioclip_jax_src holds a stand-in bioclip_jax.train
    (`python -m` finds it first, in the current directory)."""
    package = tmp_path / "bioclip_jax_src" / "bioclip_jax" / "train"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_TRAIN_MODULE)
    started = []
    yield tmp_path, started
    for run_name in started:  # nothing may outlive the test
        (stop,), _ = _dry_run("--run-name", run_name, "--stop", "--stop-timeout", "0")
        subprocess.run(["bash", "-c", _remote(stop)], env=dict(os.environ, HOME=str(tmp_path)),
                       capture_output=True, timeout=30)


def _on_worker(home, remote, **env):
    """Runs a command meant for a worker here, as gcloud's ssh would run it there."""
    return subprocess.run(["bash", "-c", remote], env=dict(os.environ, HOME=str(home), **env),
                          capture_output=True, text=True, timeout=60)


def _start_on_worker(home, started, run_name, **env):
    started.append(run_name)
    commands, _ = _dry_run("--run-name", run_name, "--python", sys.executable, "--skip-install", "--detach", "--",
                           *TRAIN_ARGS)
    result = _on_worker(home, _remote(commands[0]), **env)  # returns at once: the run is detached
    assert result.returncode == 0, result.stderr
    log = home / "bioclip_jax_logs" / f"{run_name}.log"
    _wait_for(lambda: log.exists() and "fake train" in log.read_text(), what=f"{run_name} to start")
    return int((home / "bioclip_jax_logs" / f"{run_name}.pid").read_text())


def _commands_for(run_name, *args):
    (command,), _ = _dry_run("--run-name", run_name, *args)
    return _remote(command)


def test_tpu_worker_run_survives_its_session_and_stops_on_stop(worker_home):
    home, started = worker_home
    run_name, other = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    wrapper = _start_on_worker(home, started, run_name)
    _start_on_worker(home, started, other)
    with open(f"/proc/{wrapper}/stat") as f:
        session = int(f.read().rsplit(")", 1)[1].split()[3])
    assert session == wrapper  # setsid: its own session, not the (ended) ssh session's
    log = (home / "bioclip_jax_logs" / f"{run_name}.log").read_text()
    assert f"starting run {run_name}" in log and f"fake train {run_name}" in log and "/shared/run one" in log

    again = _on_worker(home, _remote(_dry_run("--run-name", run_name, "--python", sys.executable,
                                              "--skip-install", "--detach", "--", *TRAIN_ARGS)[0][0]))
    assert again.returncode == 1 and "already running" in again.stderr

    follow = subprocess.Popen(["bash", "-c", _commands_for(run_name, "--logs")], env=dict(os.environ, HOME=str(home)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = _on_worker(home, _commands_for(run_name, "--stop", "--stop-timeout", "20"))
    assert stop.returncode == 0, stop.stderr
    output, _ = follow.communicate(timeout=30)
    assert follow.returncode == STOPPED, output        # --logs ends with the run, with its status
    assert "saved a checkpoint" in output
    assert (home / "bioclip_jax_logs" / f"{run_name}.status").read_text().strip() == str(STOPPED)
    other_pid = int((home / "bioclip_jax_logs" / f"{other}.pid").read_text())
    os.kill(other_pid, 0)  # the other run was left alone
    assert not (home / "bioclip_jax_logs" / f"{other}.status").exists()


def test_tpu_worker_stop_kills_a_run_that_ignores_sigterm(worker_home):
    home, started = worker_home
    run_name = f"t-{uuid.uuid4().hex[:8]}"
    wrapper = _start_on_worker(home, started, run_name, FAKE_IGNORE_TERM="1")
    stop = _on_worker(home, _commands_for(run_name, "--stop", "--stop-timeout", "1"))
    assert stop.returncode == 0 and "killing process group" in stop.stdout, stop.stdout + stop.stderr
    _wait_for(lambda: not os.path.exists(f"/proc/{wrapper}") or
              open(f"/proc/{wrapper}/stat").read().rsplit(")", 1)[1].split()[0] == "Z", what="the kill")
    logs = _on_worker(home, _commands_for(run_name, "--logs"))
    assert logs.returncode == 1 and "no exit status" in logs.stderr


# ----------------------------------------------------------------------------- local launcher

FAKE_LAUNCHED_PYTHON = """#!/bin/bash
# python stand-in for one launched process: runs FAKE_RUN_<i> seconds (default 0), then
# exits FAKE_EXIT_<i> (default 0); on SIGTERM it "saves" and exits 75 like the train binary.
i=$JAX_PROCESS_ID
eval "seconds=\\${FAKE_RUN_$i:-0} code=\\${FAKE_EXIT_$i:-0}"
sleep "$seconds" &
trap 'kill $! 2>/dev/null; echo "process $i saved"; exit 75' TERM
wait $!
exit "$code"
"""


def _start_fake_launch(tmp_path, env_extra) -> subprocess.Popen:
    """The launcher, 2 processes x 1 device, running FAKE_LAUNCHED_PYTHON; logs in tmp_path/logs."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_LAUNCHED_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), LOG_DIR=str(tmp_path / "logs"), COORDINATOR_PORT="1",
               KILL_GRACE_SECONDS="3", STOP_TIMEOUT_SECONDS="5", **env_extra)
    # A shell started with SIGINT ignored (pytest run in the background, as by nohup) may not
    # trap it; the launcher must start as a terminal would start it, with SIGINT at its default.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(["bash", LAUNCHER, "2", "1", "--", "--workdir=w"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)


def _launch(tmp_path, env_extra, signal_after=None):
    launcher = _start_fake_launch(tmp_path, env_extra)
    try:
        if signal_after is not None:
            _wait_for(lambda: len(list((tmp_path / "logs").glob("*.pid"))) == 2, what="2 processes")
            time.sleep(signal_after)
            launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    return launcher.returncode, output


@pytest.mark.parametrize("statuses, expected", [
    ((STOPPED, STOPPED), STOPPED),       # every process saved and stopped
    ((0, STOPPED), STOPPED),             # one finished as the other stopped: still a stop
    ((0, 0), 0),
])
def test_local_launcher_exit_status(tmp_path, statuses, expected):
    returncode, output = _launch(tmp_path, {f"FAKE_EXIT_{i}": str(s) for i, s in enumerate(statuses)})
    assert returncode == expected, output
    if expected == STOPPED:
        assert "rerun the same command to resume" in output


def test_local_launcher_ctrl_c_saves_and_exits_75(tmp_path):
    returncode, output = _launch(tmp_path, {"FAKE_RUN_0": "60", "FAKE_RUN_1": "60"}, signal_after=0.5)
    assert returncode == STOPPED, output
    assert "process 0 saved" in output  # process 0 prints to the terminal


def test_local_launcher_gives_the_others_time_to_stop_then_stops_them(tmp_path):
    """Process 0 stops by itself; process 1 never does: after STOP_TIMEOUT_SECONDS it is asked to."""
    returncode, output = _launch(tmp_path, {"FAKE_EXIT_0": str(STOPPED), "FAKE_RUN_1": "60"})
    assert returncode == STOPPED, output
    assert "did not stop within 5s" in output


def test_local_launcher_stops_the_others_when_one_fails(tmp_path):
    started = time.time()
    returncode, output = _launch(tmp_path, {"FAKE_RUN_0": "60", "FAKE_EXIT_1": "1"})
    assert returncode == 1, output
    assert time.time() - started < 30
    assert "process 1" in output and "stopping the others" in output


def test_local_launcher_exits_with_the_signal_of_a_killed_process(tmp_path):
    """The offline twin of test_multiprocess's SIGKILL check: 128 + 9, and nothing left running."""
    logs = tmp_path / "logs"
    launcher = _start_fake_launch(tmp_path, {"FAKE_RUN_0": "60", "FAKE_RUN_1": "60"})
    try:
        _wait_for(lambda: len(list(logs.glob("*.pid"))) == 2, what="2 processes")
        pids = [int((logs / f"process-{i}.pid").read_text()) for i in range(2)]
        os.kill(pids[1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 128 + signal.SIGKILL, output
    assert "process 1" in output and "stopping the others" in output
    for pid in pids:  # each process led its own group (setsid); nothing of either group is left
        _wait_for(lambda: not _live_members(pid), timeout=10, what=f"process group {pid} to end")


def _live_members(group: int) -> list[int]:
    """Processes of a process group that are neither gone nor zombies."""
    members = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    live = []
    for member in members:
        try:
            with open(f"/proc/{member}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            live.append(int(member))
    return live


FAKE_ARGS_PYTHON = """#!/bin/bash
# python stand-in that records the arguments of each launched process.
printf '%s\\n' "$@" > "$LOG_DIR/args-$JAX_PROCESS_ID"
"""


@pytest.mark.parametrize("cpus, given, expected", [
    ("8", [], ["--config.data.workers=3"]),       # 4 CPUs each: 3 workers beside the main process
    ("2", [], ["--config.data.workers=0"]),       # 1 CPU each: decode in the main process
    ("8", ["--config.data.workers=1"], ["--config.data.workers=1"]),
])
def test_local_launcher_shares_the_cpus_among_the_processes_data_workers(tmp_path, cpus, given, expected):
    fake = tmp_path / "python"
    fake.write_text(FAKE_ARGS_PYTHON)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), LOG_DIR=str(tmp_path / "logs"), COORDINATOR_PORT="1", CPUS=cpus)
    result = subprocess.run(["bash", LAUNCHER, "2", "1", "--", "--workdir=w", *given], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for i in range(2):
        args = (tmp_path / "logs" / f"args-{i}").read_text().splitlines()
        assert [a for a in args if "data.workers" in a] == expected
