"""A long run survives its own failures: bad checkpoints, NaN states, failed saves, changed configs.

Each check is a small real training run on the tiny synthetic tree of life (in-process,
8 simulated devices) with one thing broken the way it breaks in practice.
"""

import errno
import shutil

import numpy as np
import pytest

from bioclip_jax.train import checkpointing
from bioclip_jax.train.metrics import read_metrics
from train_helpers import losses, run, shards, smoke_config  # noqa: F401 - shards is a fixture

CHECKPOINTED = {"total_steps": 6, "checkpoint__every_steps": 3}


@pytest.fixture(scope="module")
def straight_run(shards, tmp_path_factory):
    """6 uninterrupted steps, checkpoints at 3 and 6: the losses every broken run must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    return workdir, losses(run(workdir, shards, **CHECKPOINTED))


def _steps_on_disk(workdir) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _copy(workdir, destination, keep_up_to: int):
    """The workdir as a run left it when it crashed just after saving `keep_up_to`."""
    shutil.copytree(workdir, destination)
    for step in _steps_on_disk(destination):
        if step > keep_up_to:
            shutil.rmtree(destination / "checkpoints" / str(step))
    return destination


def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(straight_run, shards, tmp_path,
                                                                               capsys):
    workdir = _copy(straight_run[0], tmp_path / "damaged", keep_up_to=6)
    data_files = [p for p in (workdir / "checkpoints" / "6" / "params").rglob("*") if p.is_file()]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:  # one data file cut in half, as a crashed copy leaves it
        f.truncate(biggest.stat().st_size // 2)
    after = losses(run(workdir, shards, **CHECKPOINTED))

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "checkpoint step 6 is unreadable" in line]
    assert len(lines) == 1 and "moved it to" in lines[0], err
    aside = list((workdir / checkpointing.UNREADABLE_DIR).iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["6"]  # moved, never deleted
    for step in (4, 5, 6):  # recomputed from step 3, exactly as the straight run did
        assert after[step] == straight_run[1][step], step


def test_a_checkpoint_of_another_model_is_a_config_error_and_nothing_is_moved(straight_run, shards, tmp_path):
    workdir = _copy(straight_run[0], tmp_path / "other_model", keep_up_to=6)
    (workdir / "config.json").unlink()  # no saved config: only the shapes can tell
    with pytest.raises(ValueError, match="shape"):
        run(workdir, shards, model__name="ViT-B-32", **CHECKPOINTED)
    assert _steps_on_disk(workdir) == [3, 6]
    assert not (workdir / checkpointing.UNREADABLE_DIR).exists()


def test_a_non_finite_state_is_never_saved_and_the_last_good_checkpoint_is_named(straight_run, shards, tmp_path):
    import jax

    from bioclip_jax.parallel.mesh import make_mesh
    from bioclip_jax.train import state as state_lib

    workdir = _copy(straight_run[0], tmp_path / "nan", keep_up_to=3)
    config = smoke_config(shards, **CHECKPOINTED)
    skeleton = state_lib.model_skeleton(config)
    layout = state_lib.state_layout(config, skeleton, make_mesh(8, 1, 1))
    manager = checkpointing.TrainCheckpointer(workdir, 3, 5, async_save=False)
    state = manager.restore(3, layout, _NoIterator())
    key = sorted(state["params"])[0]
    state["params"][key] = state["params"][key] * jax.numpy.nan
    with pytest.raises(checkpointing.NonFiniteStateError,
                       match=r"NaN or inf at step 4; it was not saved\. The last good checkpoint is step 3"):
        manager.save(4, state, _NoIterator(), force=True)
    manager.close()
    assert _steps_on_disk(workdir) == [3]


class _NoIterator:
    """The data iterator's part of a checkpoint is not under test here."""

    def set_state(self, state):
        pass

    def get_state(self):
        return {}


def test_a_failed_background_save_stops_the_run_at_the_next_step(shards, tmp_path, monkeypatch):
    """The second save (step 10; Orbax also saves step 1) fails in Orbax's background thread,
    as with a full disk: the run stops at the next step with one message naming the path and
    the cause, and the step-1 checkpoint stays good."""
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    real_wait = async_checkpointer._background_wait_for_commit_futures
    calls, failed_after = [], []
    workdir = tmp_path / "full"

    def full_disk_on_second_save(directory, commit_futures, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the writes end, then the commit fails: nothing of it may be used
            for commit in commit_futures:
                commit.result()
            failed_after.append(max(losses(read_metrics(str(workdir)))))  # the last step done by then
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_wait(directory, commit_futures, *args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", full_disk_on_second_save)
    with pytest.raises(checkpointing.CheckpointError) as raised:
        run(workdir, shards, total_steps=24, checkpoint__every_steps=10, checkpoint__async_save=True)
    message = str(raised.value)
    assert "No space left on device" in message and str(workdir / "checkpoints") in message
    assert "last good checkpoint is step 1" in message and "\n" not in message
    logged = max(losses(read_metrics(str(workdir))))
    # The save runs in the background: it fails while some step runs; the next step must notice,
    # long before the next save (step 20), where the old code first heard of it; on a loaded machine
    # the failing commit itself can land several steps after step 10. The bound allows
    # two steps past the last logged one: metrics are written one step late (the host reads step
    # N's after dispatching N+1), and a failure landing just after the host's check before a
    # dispatch is seen at the following one.
    assert logged <= failed_after[0] + 2 and logged < 20, \
        f"the save failed after step {failed_after[0]} but the run went on to step {logged}"
    monkeypatch.undo()
    assert _steps_on_disk(workdir) == [1]
    resumed = losses(run(workdir, shards, total_steps=12, checkpoint__every_steps=5, stop_after=3))
    assert sorted(resumed) == [1, 2, 3]


def test_resuming_drops_metrics_rows_past_the_restored_step(straight_run, shards, tmp_path):
    workdir = _copy(straight_run[0], tmp_path / "rows", keep_up_to=3)  # metrics.jsonl holds rows 1..6
    run(workdir, shards, **CHECKPOINTED)
    steps = [r["step"] for r in read_metrics(str(workdir)) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert losses(read_metrics(str(workdir))) == straight_run[1]


def test_resuming_with_a_changed_recipe_is_refused_with_a_diff(straight_run, shards, tmp_path):
    workdir = _copy(straight_run[0], tmp_path / "changed", keep_up_to=3)
    with pytest.raises(ValueError, match=r"optimizer\.lr"):
        run(workdir, shards, optimizer__lr=0.5, **CHECKPOINTED)
    resumed = losses(run(workdir, shards, total_steps=6, checkpoint__every_steps=2, stop_after=4))
    assert resumed[4] == straight_run[1][4]  # the checkpoint interval may change


def test_an_allowed_model_change_is_recorded_and_reaches_the_model_json(straight_run, shards, tmp_path):
    import json

    from bioclip_jax.train.loop import train
    from bioclip_jax.train.run_identity import read_config_history

    workdir = _copy(straight_run[0], tmp_path / "quickgelu", keep_up_to=3)
    with pytest.raises(ValueError, match=r"model\.name: \"ViT-Tiny-8\" -> \"ViT-Tiny-8-quickgelu\""):
        run(workdir, shards, model__name="ViT-Tiny-8-quickgelu", **CHECKPOINTED)
    config = smoke_config(shards, model__name="ViT-Tiny-8-quickgelu", **CHECKPOINTED)
    train(config, str(workdir), stop_after=4, allow_config_change=True)
    assert json.loads((workdir / "bioclip_jax_model.json").read_text())["model_cfg"].get("quick_gelu") is True
    assert json.loads((workdir / "config.json").read_text())["model"]["name"] == "ViT-Tiny-8-quickgelu"
    [entry] = read_config_history(workdir)
    assert entry["step"] == 3 and entry["changes"]["model.name"] == ["ViT-Tiny-8", "ViT-Tiny-8-quickgelu"]


def test_a_diverging_run_stops_naming_the_last_good_checkpoint(shards, tmp_path):
    """With a learning rate that blows the weights up, the run stops at the first non-finite
    loss or state, and the message says which checkpoint to go back to."""
    workdir = tmp_path / "diverged"
    with pytest.raises(FloatingPointError, match=r"The last good checkpoint is step 1 in "):
        run(workdir, shards, optimizer__lr=1e30, total_steps=6, checkpoint__every_steps=2, log_every_steps=4)
    assert _steps_on_disk(workdir) == [1]


# ----------------------------------------------------------------------------- what counts as damage


def _truncate_biggest_file(step_dir) -> None:
    data_files = [p for p in (step_dir / "params").rglob("*") if p.is_file()]
    biggest = max(data_files, key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 2)


def _layout(config):
    from bioclip_jax.parallel.mesh import make_mesh
    from bioclip_jax.train import state as state_lib

    return state_lib.state_layout(config, state_lib.model_skeleton(config), make_mesh(8, 1, 1))


@pytest.mark.parametrize("change", [{"optimizer__grad_clip_norm": 1.0}, {"optimizer__freeze": "image"}])
def test_an_accepted_optimizer_change_keeps_the_checkpoints_and_the_progress(straight_run, shards, tmp_path,
                                                                          change, capsys):
    """Clipping or a frozen tower changes the optimiser state's tree: the run resumes from its newest
    checkpoint (the old code took both checkpoints for damaged, moved them aside and stopped)."""
    from bioclip_jax.train.loop import train

    workdir = _copy(straight_run[0], tmp_path / "changed_optimizer", keep_up_to=6)
    config = smoke_config(shards, **change, **{**CHECKPOINTED, "total_steps": 7})
    train(config, str(workdir), allow_config_change=True)
    assert not (workdir / checkpointing.UNREADABLE_DIR).exists()
    assert 7 in _steps_on_disk(workdir)
    assert [r["step"] for r in read_metrics(str(workdir)) if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]
    assert "restored its parameters, carried over" in capsys.readouterr().err


def test_optimizer_arrays_that_still_apply_are_carried_over(straight_run, shards):
    """Clipping puts the AdamW state one level down ((clip, adamw)); every Adam moment and step count
    of the checkpoint arrives at its new place, and the parameters are the saved ones."""
    import jax

    from bioclip_jax.checkpoint import carry_over

    def restored(config):
        manager = checkpointing.TrainCheckpointer(straight_run[0], 3, 5, async_save=False)
        try:
            return manager.restore(6, _layout(config), _NoIterator())
        finally:
            manager.close()

    saved = restored(smoke_config(shards, **CHECKPOINTED))
    carried = restored(smoke_config(shards, optimizer__grad_clip_norm=1.0, **CHECKPOINTED))

    def leaves(tree):
        return {carry_over.path_names(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}

    before, after = leaves(saved["opt_state"]), leaves(carried["opt_state"])
    assert set(after) == {("1", *path) for path in before}  # (clip state, adamw state): one level down
    for path, value in before.items():
        np.testing.assert_array_equal(after[("1", *path)], value, err_msg=str(path))
    assert int(after[("1", "0", "count")]) == 6
    for key in saved["params"]:
        np.testing.assert_array_equal(np.asarray(carried["params"][key]), np.asarray(saved["params"][key]))


def test_carry_over_starts_moments_fresh_where_no_saved_array_fits():
    saved = {("0", "count"): ((), "int32"), ("0", "mu", "text.w"): ((4,), "float32"),
             ("0", "nu", "text.w"): ((4,), "float32"), ("2", "count"): ((), "int32")}
    wanted = {("0", "count"): ((), "int32"), ("0", "mu", "text.w"): ((4,), "float32"),
              ("0", "mu", "visual.w"): ((4,), "float32"), ("0", "nu", "text.w"): ((5,), "float32"),
              ("acc_grads", "text.w"): ((4,), "float32"), ("2", "count"): ((), "int32")}
    from bioclip_jax.checkpoint import carry_over

    assert carry_over.match_leaves(saved, wanted) == {("0", "count"): ("0", "count"),
                                                      ("0", "mu", "text.w"): ("0", "mu", "text.w"),
                                                      ("2", "count"): ("2", "count")}


@pytest.fixture
def fast_retries(monkeypatch):
    from bioclip_jax.checkpoint import faults

    monkeypatch.setattr(faults, "RETRY_DELAYS_S", (0.0, 0.0))


def _failing_reads(monkeypatch, error: Exception, times: int) -> list:
    """The first `times` array reads raise `error`, as a storage fault would; returns the list of calls."""
    import orbax.checkpoint as ocp

    real, calls = ocp.StandardCheckpointHandler.restore, []

    def restore(self, directory, *args, **kwargs):
        calls.append(str(directory))
        if len(calls) <= times:
            raise error
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", restore)
    return calls


def _restore_latest(workdir, shards):
    manager = checkpointing.TrainCheckpointer(workdir, 3, 5, async_save=False)
    try:
        return manager.restore_latest_good(_layout(smoke_config(shards, **CHECKPOINTED)), _NoIterator())
    finally:
        manager.close()


def test_a_passing_storage_error_is_retried_and_moves_nothing(straight_run, shards, tmp_path, monkeypatch,
                                                              fast_retries):
    workdir = _copy(straight_run[0], tmp_path / "flaky", keep_up_to=6)
    calls = _failing_reads(monkeypatch, ValueError("UNAVAILABLE: connection reset by peer"), times=2)
    step, _ = _restore_latest(workdir, shards)
    assert step == 6 and len(calls) > 2
    assert not (workdir / checkpointing.UNREADABLE_DIR).exists()


@pytest.mark.parametrize("error, expected", [
    (ConnectionResetError(104, "Connection reset by peer"), r"failed 3 times \(ConnectionResetError"),
    (RuntimeError("something unforeseen"), r"not known to be damage"),
])
def test_an_error_that_is_not_damage_stops_the_run_and_leaves_the_checkpoints(straight_run, shards, tmp_path,
                                                                             monkeypatch, fast_retries, error,
                                                                             expected):
    workdir = _copy(straight_run[0], tmp_path / "unreachable", keep_up_to=6)
    _failing_reads(monkeypatch, error, times=100)
    with pytest.raises(checkpointing.CheckpointError, match=expected) as raised:
        _restore_latest(workdir, shards)
    assert "checkpoint step 6" in str(raised.value) and "\n" not in str(raised.value)
    assert _steps_on_disk(workdir) == [3, 6]
    assert not (workdir / checkpointing.UNREADABLE_DIR).exists()


def test_a_read_that_hangs_stops_at_its_deadline_naming_the_checkpoint(straight_run, shards, tmp_path,
                                                                      monkeypatch):
    import threading

    import orbax.checkpoint as ocp

    workdir = _copy(straight_run[0], tmp_path / "hangs", keep_up_to=6)
    release = threading.Event()
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", lambda *a, **k: release.wait(60))
    monkeypatch.setenv("BIOCLIP_JAX_STORAGE_TIMEOUT_S", "1")
    try:
        with pytest.raises(checkpointing.CheckpointError, match=r"did not finish within 1 s") as raised:
            _restore_latest(workdir, shards)
    finally:
        release.set()
        for thread in threading.enumerate():  # the abandoned read ends before the test does
            if thread.name.startswith("storage:"):
                thread.join(60)
    assert f"checkpoint step 6 in {workdir / 'checkpoints'}" in str(raised.value)
    assert _steps_on_disk(workdir) == [3, 6]


def test_a_workdir_whose_checkpoints_all_went_aside_does_not_restart_from_zero_unasked(straight_run, shards,
                                                                                       tmp_path):
    """The old code trained a plain rerun from step 0 without a word, and logged each step twice."""
    from bioclip_jax.train.loop import train

    workdir = _copy(straight_run[0], tmp_path / "all_damaged", keep_up_to=6)
    for step in (3, 6):
        _truncate_biggest_file(workdir / "checkpoints" / str(step))
    with pytest.raises(checkpointing.CheckpointError, match="no checkpoint .* reads cleanly"):
        run(workdir, shards, **CHECKPOINTED)
    with pytest.raises(checkpointing.CheckpointError, match="--allow-fresh-start") as raised:
        run(workdir, shards, **CHECKPOINTED)  # the plain rerun
    assert "would start again from step 0" in str(raised.value)
    assert _steps_on_disk(workdir) == []
    train(smoke_config(shards, **CHECKPOINTED), str(workdir), stop_after=2, allow_fresh_start=True)
    assert [r["step"] for r in read_metrics(str(workdir)) if "loss" in r] == [1, 2]


@pytest.mark.parametrize("error, kind", [
    (ValueError("DATA_LOSS: Error decoding manifest"), "damaged"),
    (ValueError("OUT_OF_RANGE: Requested byte range [2, 9) is not valid for value of size 4"), "damaged"),
    (ValueError('FAILED_PRECONDITION: Error reading "x/_sharding": Invalid JSON'), "damaged"),
    (ValueError("Expecting value: line 1 column 1 (char 0)"), "unknown"),
    (FileNotFoundError(2, "No such file or directory"), "damaged"),
    (ValueError("UNAVAILABLE: Failed to connect"), "transient"),
    (ValueError("DEADLINE_EXCEEDED: no answer"), "transient"),
    (TimeoutError("timed out"), "transient"),
    (OSError(5, "Input/output error"), "transient"),
    (ValueError("User-provided restore item and on-disk value metadata tree structures do not match"), "mismatch"),
    (RuntimeError("something else"), "unknown"),
])
def test_errors_are_classified_by_what_they_say_about_the_files(error, kind):
    import json

    from bioclip_jax.checkpoint import faults

    assert faults.classify(error) == kind
    wrapped = Exception("Encountered error while reading array index")
    wrapped.__cause__ = error  # how Orbax re-raises tensorstore's errors
    assert faults.classify(wrapped) == kind
    try:
        json.loads("")
    except ValueError as real:
        assert faults.classify(real) == "damaged"


def test_a_fresh_start_logs_each_step_once(straight_run, shards, tmp_path):
    """Killed before its first checkpoint was committed (or after that save failed on a full disk), a run
    starts again from step 0; the rows its first attempt logged go (the old code kept them: each step twice)."""
    workdir = _copy(straight_run[0], tmp_path / "no_checkpoint", keep_up_to=0)
    run(workdir, shards, stop_after=2, **CHECKPOINTED)
    assert [r["step"] for r in read_metrics(str(workdir)) if "loss" in r] == [1, 2]


def test_a_damaged_config_json_is_named(straight_run, shards, tmp_path):
    workdir = _copy(straight_run[0], tmp_path / "bad_config", keep_up_to=6)
    (workdir / "config.json").write_text('{"model": ')  # the old message: "Expecting value: line 1 column 1"
    with pytest.raises(ValueError, match=f"{workdir / 'config.json'} is damaged: it does not hold valid JSON"):
        run(workdir, shards, **CHECKPOINTED)


def test_a_schedule_shorter_than_the_latest_checkpoint_is_refused(straight_run, shards, tmp_path):
    """The old code exported step 6 and wrote DONE saying 4."""
    from bioclip_jax.train.job import run_job

    workdir = _copy(straight_run[0], tmp_path / "shorter", keep_up_to=6)
    with pytest.raises(ValueError, match=r"checkpoint at step 6, past --config.total_steps=4.*at least 6"):
        run_job(smoke_config(shards, **{**CHECKPOINTED, "total_steps": 4}), str(workdir))
    assert not (workdir / "DONE").exists() and not (workdir / "open_clip").exists()


@pytest.mark.parametrize("blocking", ["save", "wait_until_finished"])
def test_a_save_that_hangs_stops_at_its_deadline_naming_the_folder(tmp_path, monkeypatch, blocking):
    """A bucket that stops answering mid-run: the next save waits for the previous one, and the last
    wait at the end of the run, forever on the old code."""
    import threading

    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    release = threading.Event()
    monkeypatch.setattr(ocp.CheckpointManager, blocking, lambda *args, **kwargs: release.wait(60))
    monkeypatch.setenv("BIOCLIP_JAX_STORAGE_TIMEOUT_S", "1")
    manager = checkpointing.TrainCheckpointer(tmp_path, 3, 5)
    state = {"params": {"w": jnp.ones(3)}, "opt_state": {"w": jnp.zeros(3)}}
    try:
        with pytest.raises(checkpointing.CheckpointError, match=r"did not finish within 1 s") as raised:
            manager.save(3, state, _NoIterator(), force=True) if blocking == "save" else manager.wait()
    finally:
        release.set()
    assert str(tmp_path / "checkpoints") in str(raised.value) and "the run is stopped" in str(raised.value)
