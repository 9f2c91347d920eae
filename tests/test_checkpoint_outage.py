"""A save that fails because the storage is gone still ends in its one sentence, though the listing of
the last good checkpoint, which that sentence ends with, fails or hangs too."""

import errno
import time

import pytest

from bioclip_jax.train import checkpointing


@pytest.fixture
def checkpointer(tmp_path):
    manager = checkpointing.TrainCheckpointer(tmp_path, every_steps=5, keep=2, async_save=False)
    yield manager
    manager.manager.close()


def _failed_save(checkpointer) -> str:
    return str(checkpointer._save_failed(OSError(errno.ECONNREFUSED, "Cannot connect to host storage")))


def test_the_save_failure_is_said_when_the_listing_fails_too(checkpointer, monkeypatch):
    """The old code raised the listing's own error from inside the message: the save failure was lost."""
    def unreachable(directory):
        raise OSError("Cannot connect to host storage.googleapis.com:443")

    monkeypatch.setattr(checkpointing, "finished_steps", unreachable)
    message = _failed_save(checkpointer)
    assert message.startswith(f"saving a checkpoint under {checkpointer.directory} failed (ConnectionRefusedError")
    assert "the run is stopped. The checkpoints cannot be listed now (Cannot connect" in message
    assert "\n" not in message


def test_a_listing_that_hangs_is_cut_short(checkpointer, monkeypatch):
    monkeypatch.setattr(checkpointing, "finished_steps", lambda directory: time.sleep(60))
    monkeypatch.setattr(checkpointing, "LISTING_DEADLINE_S", 1.0)
    start = time.monotonic()
    message = _failed_save(checkpointer)
    assert time.monotonic() - start < 10
    assert "The checkpoints cannot be listed now (listing the checkpoints in" in message


def test_with_the_storage_back_the_last_good_step_is_named(checkpointer, monkeypatch):
    monkeypatch.setattr(checkpointing, "finished_steps", lambda directory: [5, 10])
    assert _failed_save(checkpointer).endswith(
        f"The last good checkpoint is step 10 in {checkpointer.directory}; rerunning resumes from it.")
