"""The train binary: one `error:` line and a documented exit status for what users get wrong,
and one job at a time per workdir (WORKDIR/LOCK)."""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest
from etils import epath
from gcs_server import gcs_bucket, gcs_dir  # noqa: F401 - fixtures
from train_helpers import shards  # noqa: F401 - fixture

from bioclip_jax.cli import train as train_main
from bioclip_jax import exit_codes
from bioclip_jax.train.workdir import LOCK_FILE, WorkdirInUseError, WorkdirLock, check_workdir

REPO = os.path.join(os.path.dirname(__file__), "..")
CONFIG = f"--config={REPO}/configs/synthetic_tiny.py:smoke"


def train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bioclip_jax.train", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def one_error_line(result: subprocess.CompletedProcess, status: int) -> str:
    """The single `error:` line of a run that failed with `status`, and no traceback."""
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == status, report
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr, report
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, report
    return errors[0]


# ----------------------------------------------------------------------------- one line per mistake


def test_read_only_workdir_is_one_line(shards):
    workdir = "/sys/kernel"  # sysfs refuses new files even to root, which chmod does not
    try:
        check_workdir(workdir)
        pytest.skip(f"{workdir} is writable here")
    except OSError:
        pass
    line = one_error_line(train_cli(CONFIG, f"--workdir={workdir}", f"--config.data.train_shards={shards}"),
                          exit_codes.ERROR)
    assert f"cannot write to workdir {workdir}" in line and "writable directory" in line


def test_workdir_that_is_a_file_is_one_line(shards, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    line = one_error_line(train_cli(CONFIG, f"--workdir={path}", f"--config.data.train_shards={shards}"),
                          exit_codes.ERROR)
    assert f"workdir {path} is a file" in line and "give a directory" in line


def test_misspelt_override_is_a_usage_error_naming_the_field(tmp_path):
    line = one_error_line(train_cli(CONFIG, f"--workdir={tmp_path}", "--config.totl_steps=5"), exit_codes.USAGE)
    assert "'totl_steps'" in line and "did you mean 'total_steps'" in line


def test_missing_config_file_is_a_usage_error(tmp_path):
    line = one_error_line(train_cli("--config=configs/nope.py", f"--workdir={tmp_path}"), exit_codes.USAGE)
    assert "config file not found: configs/nope.py" in line


def test_missing_init_weights_is_one_line_without_shutdown_noise(shards, tmp_path):
    """Orbax's CheckpointManager scans its folder for unfinished saves in a background thread.

    A run that failed before that scan ended used to exit under it ("cannot schedule new
    futures after interpreter shutdown"); a folder with many entries makes the scan outlast
    the failure every time, not just on a slow disk or bucket.
    """
    for i in range(2000):
        (tmp_path / "run" / "checkpoints" / f"not-a-step-{i}").mkdir(parents=True)
    result = train_cli(CONFIG, f"--workdir={tmp_path / 'run'}", f"--config.data.train_shards={shards}",
                       "--config.init=/nope.safetensors")
    line = one_error_line(result, exit_codes.USAGE)  # a missing file the config names is an input error
    assert "/nope.safetensors" in line
    assert "cannot schedule new futures" not in result.stderr + result.stdout


def test_a_first_run_whose_init_cannot_be_read_leaves_no_empty_folders(shards, tmp_path):
    result = train_cli(CONFIG, f"--workdir={tmp_path / 'run'}", f"--config.data.train_shards={shards}",
                       "--config.init=/nope.safetensors")
    assert "/nope.safetensors" in one_error_line(result, exit_codes.USAGE)
    left = sorted(p.name for p in (tmp_path / "run").iterdir()) if (tmp_path / "run").exists() else []
    assert "checkpoints" not in left and "tensorboard" not in left, left


def test_second_job_in_a_locked_workdir_refuses(shards, tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        line = one_error_line(train_cli(CONFIG, f"--workdir={tmp_path}", f"--config.data.train_shards={shards}"),
                              exit_codes.ERROR)
    finally:
        holder.kill()
        holder.wait()
    assert f"process {holder.pid} on host {socket.gethostname()}" in line
    assert not (tmp_path / "checkpoints").exists()  # refused before any work


# ----------------------------------------------------------------------------- exit statuses, in process


class FakeJob:
    """Stands in for run_job: records its arguments (and whether the lock was held), then returns or raises."""

    def __init__(self):
        self.calls, self.result, self.error = [], {}, None

    def __call__(self, config, workdir, **kwargs):
        self.calls.append({"config": config, "lock_held": (epath.Path(workdir) / LOCK_FILE).exists(), **kwargs})
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def fake_job(monkeypatch):
    import bioclip_jax.train.job as job
    fake = FakeJob()
    monkeypatch.setattr(job, "run_job", fake)
    return fake


def test_a_stop_exits_75_and_the_flags_reach_the_job(fake_job, tmp_path):
    fake_job.result = {"loss": 1.0, "stopped": True}
    status = train_main.main([CONFIG, f"--workdir={tmp_path}", "--allow-config-change", "--stop-after=3",
                              "--config.total_steps=7", "--allow-fresh-start"])
    assert status == exit_codes.STOPPED
    (call,) = fake_job.calls
    assert call["allow_config_change"] is True and call["stop_after"] == 3 and call["config"].total_steps == 7
    assert call["allow_fresh_start"] is True
    assert call["lock_held"] and not (tmp_path / LOCK_FILE).exists()  # held during the job, released after


def test_a_finish_exits_0_and_an_error_exits_1_releasing_the_lock(fake_job, tmp_path, capsys):
    assert train_main.main([CONFIG, f"--workdir={tmp_path}"]) == exit_codes.FINISHED
    assert fake_job.calls[0]["allow_config_change"] is False and fake_job.calls[0]["allow_fresh_start"] is False
    fake_job.error = ValueError("config.data.train_shards is empty")
    assert train_main.main([CONFIG, f"--workdir={tmp_path}"]) == exit_codes.ERROR
    assert capsys.readouterr().err == "error: config.data.train_shards is empty\n"
    assert fake_job.calls[1]["lock_held"] and not (tmp_path / LOCK_FILE).exists()


def test_bioclip_jax_train_returns_the_same_statuses(tmp_path):
    from bioclip_jax.cli import main as cli
    assert cli.main(["train", f"--workdir={tmp_path}"]) == exit_codes.USAGE  # --config missing (argparse)
    assert cli.main(["train", CONFIG, f"--workdir={tmp_path}", "--config.optimizer.lrr=1"]) == exit_codes.USAGE


# ----------------------------------------------------------------------------- the workdir lock


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_lock(workdir, **holder) -> None:
    (epath.Path(workdir) / LOCK_FILE).write_text(json.dumps(holder))


def test_lock_is_written_and_released(tmp_path):
    with WorkdirLock(tmp_path):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["started"]
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_is_released_after_an_error(tmp_path):
    with pytest.raises(KeyError), WorkdirLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_FILE).exists()


def test_live_holder_refuses(tmp_path):
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path, host=socket.gethostname(), pid=holder.pid)
        with pytest.raises(WorkdirInUseError, match=f"process {holder.pid} on host {socket.gethostname()}"):
            with WorkdirLock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left alone


def test_dead_holder_on_this_host_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, host=socket.gethostname(), pid=pid)
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock {tmp_path / LOCK_FILE} of process {pid}" in capsys.readouterr().err
    assert not (tmp_path / LOCK_FILE).exists()


def test_holder_on_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, host="some-other-node", pid=dead_pid())
    with pytest.raises(WorkdirInUseError, match=f"If you know that job is dead, delete {tmp_path / LOCK_FILE}"):
        with WorkdirLock(tmp_path):
            pass
    assert (tmp_path / LOCK_FILE).exists()


def test_requeued_slurm_job_takes_over_its_own_lock_from_another_host(tmp_path, monkeypatch, capsys):
    write_lock(tmp_path, host="node-that-failed", pid=1234, slurm_job_id="77", slurm_restart_count=0)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with WorkdirLock(tmp_path):
        pass
    assert "earlier run of this SLURM job 77" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: refused
    write_lock(tmp_path, host="node-that-failed", pid=1234, slurm_job_id="77", slurm_restart_count=0)
    with pytest.raises(WorkdirInUseError):
        with WorkdirLock(tmp_path):
            pass


def test_lock_and_workdir_check_on_a_bucket(gcs_dir):
    workdir = check_workdir(gcs_dir)
    with WorkdirLock(workdir):
        assert json.loads((workdir / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (workdir / LOCK_FILE).exists()
    write_lock(workdir, host="some-other-node", pid=1)
    with pytest.raises(WorkdirInUseError, match="some-other-node"):
        with WorkdirLock(workdir):
            pass


@pytest.mark.parametrize("content", ["", "{\"host\": \"n", "[]"])
def test_an_empty_or_damaged_lock_is_stale_and_taken_over(tmp_path, capsys, content):
    """A full disk at start-up left an empty LOCK: the old code refused every later run, "in use by
    process unknown on host unknown"."""
    (tmp_path / LOCK_FILE).write_text(content)
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    err = capsys.readouterr().err
    assert f"taking over the lock {tmp_path / LOCK_FILE} of no job" in err and "unknown" not in err
    assert not (tmp_path / LOCK_FILE).exists()


class _FullDisk:
    """A file open for writing on a full disk: every write fails with ENOSPC (the file itself is created)."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every file opened for writing through open() (also os.fdopen's) cannot be written."""
    import builtins
    import io

    real_open = io.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _FullDisk(handle) if any(m in mode for m in "wax") else handle

    monkeypatch.setattr(io, "open", open_on_full_disk)
    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    return monkeypatch


def test_a_full_disk_when_taking_the_lock_names_the_file_and_leaves_no_lock(tmp_path, full_disk):
    with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / LOCK_FILE}'"):
        with WorkdirLock(tmp_path):
            pass
    full_disk.undo()
    assert os.listdir(tmp_path) == []
    with WorkdirLock(tmp_path):  # the next run is not refused
        pass


def test_a_full_disk_names_the_file_of_a_log_line_or_a_whole_file(tmp_path, full_disk):
    from bioclip_jax import paths

    for write in (lambda path: paths.append_line(path, "{}"), lambda path: paths.write_atomically(path, "{}")):
        with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'metrics.jsonl'}'"):
            write(tmp_path / "metrics.jsonl")


def test_a_damaged_done_file_is_one_line_naming_it(tmp_path, capsys):
    (tmp_path / "DONE").write_text("")  # the old message: "Expecting value: line 1 column 1 (char 0)"
    assert train_main.main([CONFIG, f"--workdir={tmp_path}"]) == exit_codes.ERROR
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'DONE'} is damaged: it does not hold valid JSON (Expecting value: line 1 " \
                  f"column 1 (char 0))\n", err
