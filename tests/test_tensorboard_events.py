"""TensorBoard events: written in the caller's thread, so that a full disk or a silent bucket server is
said once, in one sentence naming the folder, within the storage deadline, and the run goes on."""

import builtins
import errno
import io
import logging
import os
import socket
import subprocess
import sys
import time

from gcs_server import client_env, gcs_bucket, gcs_dir  # noqa: F401 - fixtures

from bioclip_jax.tensorboard_events import EventLog, read_scalars
from bioclip_jax.train.metrics import MetricsWriter, read_metrics


def test_scalars_are_read_back_in_order_without_non_finite_values(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=10)
    writer.write(1, {"loss": 2.0, "lr": 0.25})
    writer.write(2, {"loss": float("nan"), "lr": 0.5})
    writer.close()
    assert read_scalars(tmp_path / "tensorboard") == [(1, "loss", 2.0), (1, "lr", 0.25), (2, "lr", 0.5)]


def test_a_bucket_folder_gets_a_new_events_object_per_upload(gcs_dir):
    events = EventLog(f"{gcs_dir}/tensorboard", upload_every_s=0)
    events.scalars(1, {"loss": 1.0})
    events.scalars(2, {"loss": 0.5})
    events.close()
    assert read_scalars(f"{gcs_dir}/tensorboard") == [(1, "loss", 1.0), (2, "loss", 0.5)]


def test_a_full_disk_under_tensorboard_is_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    """The old writer (tensorboardX's SummaryWriter) raised the OSError out of a later flush (or lost
    events in its own thread's traceback): the run stopped on its TensorBoard copy of the metrics."""
    real_open = io.open
    board = str(tmp_path / "tensorboard")

    class FullDisk(io.RawIOBase):
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def writable(self):
            return True

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if str(file).startswith(board) and any(m in mode for m in "wax"):
            return FullDisk()
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_on_full_disk)
    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    writer = MetricsWriter(tmp_path, total_steps=10)
    with caplog.at_level(logging.WARNING):
        for step in (1, 2, 3):
            writer.write(step, {"loss": 1.0 / step})
        writer.close()
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"writing TensorBoard events to {board} failed" in warnings[0], warnings
    assert f"No space left on device: '{board}'" in warnings[0], warnings


def test_a_bucket_server_that_never_answers_is_one_warning_within_the_deadline():
    """tensorboardX uploaded the whole events file at each flush with no time limit: a silent server held
    the run for as long as it kept the connection open."""
    code = ("from bioclip_jax.tensorboard_events import EventLog\n"
            "events = EventLog('gs://bioclip-test/run/tensorboard', upload_every_s=0)\n"
            "events.scalars(1, {'loss': 1.0})\nevents.scalars(2, {'loss': 0.5})\nevents.close()\nprint('went on')")
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        env = {**os.environ, **client_env(f"http://127.0.0.1:{silent.getsockname()[1]}"),
               "BIOCLIP_JAX_STORAGE_TIMEOUT_S": "4"}
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        seconds = time.monotonic() - start
    assert result.returncode == 0 and result.stdout.strip() == "went on", result.stderr
    warnings = [line for line in result.stderr.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 1, result.stderr
    assert "writing TensorBoard events to gs://bioclip-test/run/tensorboard failed" in warnings[0]
    assert "did not finish within 4 s" in warnings[0]
    assert seconds < 25
