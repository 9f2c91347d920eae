"""Orbax checkpoints of a training run: parameters, optimiser state and data-iterator state.

All three are saved together under WORKDIR/checkpoints/<step>/ by one CheckpointManager
(async, keep-N). WORKDIR may be local or `gs://...` (etils.epath, as Orbax itself uses).
What a multi-day run relies on:
- Orbax writes each step into a temporary folder and commits it when complete, so a
  crash in the middle of a save leaves the previous step usable.
- A state holding NaN or inf is never saved (`NonFiniteStateError` instead).
- A failed background save is noticed at the next step (`check_for_errors`), not one
  interval later, and stops the run with one message.
- Restoring picks the newest step that reads cleanly on every process. The processes agree
  on one verdict per step; only damage (`checkpoint.faults`: a truncated, garbled or missing
  file) moves a step aside to WORKDIR/checkpoints_unreadable/ (never deleted), named in one
  line. A storage that does not answer is retried, then stops the run with the checkpoints
  in place; so do a checkpoint of another model and any error not known to be damage. Every
  read has a deadline. A workdir whose checkpoints all went aside is not trained again from
  step 0 unless asked (`allow_fresh_start`).
- After an accepted change of optimiser settings (clipping, a frozen tower), the saved
  parameters are restored and the optimiser arrays that still apply are carried over
  (`checkpoint.carry_over`); the rest start fresh, and a line says how many.
- Restoring takes the abstract state with the *current* mesh's shardings, so a run saved
  on 8 devices restores onto 4 (or onto another host count).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from bioclip_jax import deadlines, paths
from bioclip_jax.checkpoint import carry_over, faults
from bioclip_jax.checkpoint.model_dir import CHECKPOINTS_DIR, PARAMS_DIR, finished_steps
from bioclip_jax.paths import absolute
from bioclip_jax.train import distributed

log = logging.getLogger(__name__)

OPT_STATE = "opt_state"
DATA = "data"
META = "meta"
UNREADABLE_DIR = "checkpoints_unreadable"
LISTING_DEADLINE_S = 60.0  # for the last-good listing that ends a failure message


class CheckpointError(OSError):
    """A checkpoint could not be written or read; the message says which and why."""


class CheckpointMismatchError(ValueError):
    """A checkpoint that reads but was written for another model: a config problem, not damage."""


class NonFiniteStateError(FloatingPointError):
    """The state to be saved holds NaN or inf; saving it would poison every resume."""


def _first_line(error: BaseException) -> str:
    """An exception's message without the stack of details some libraries append (tensorstore, Orbax)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


@jax.jit
def _all_finite(tree) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def all_finite(state: dict) -> bool:
    """One reduction on the devices, one bool to the host: parameters and optimiser state are finite."""
    return bool(jax.device_get(_all_finite({"params": state["params"], "opt_state": state["opt_state"]})))


class TrainCheckpointer:
    def __init__(self, workdir, every_steps: int, keep: int, async_save: bool = True):
        if every_steps <= 0:
            raise ValueError(f"checkpoint.every_steps must be positive, got {every_steps}")
        self.directory = absolute(workdir) / CHECKPOINTS_DIR
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        handlers = {PARAMS_DIR: ocp.StandardCheckpointHandler(), OPT_STATE: ocp.StandardCheckpointHandler(),
                    META: ocp.JsonCheckpointHandler(), DATA: grain.checkpoint.CheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        # Orbax scans for unfinished saves in a thread that close() does not wait for; a run failing
        # before its first save would exit under it ("cannot schedule new futures after interpreter shutdown").
        self.manager._maybe_await_cleanup_tmp_directory()  # noqa: SLF001 - no public way to wait for it
        # Restoring reads each item with its handler, not through the manager, whose restore ends in
        # a barrier that a process which failed to read never reaches (see restore_latest_good).
        self._array_reader = ocp.PyTreeCheckpointHandler()
        self._state_reader = ocp.StandardCheckpointHandler()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    # ---- saving ----------------------------------------------------------------------------------

    def save(self, step: int, state: dict, data_iterator: Any, force: bool = False) -> bool:
        """Saves `state` (asynchronously) when the interval says so or `force`; refuses a non-finite state."""
        if not force and not self.manager.should_save(step):
            return False
        if not all_finite(state):
            raise NonFiniteStateError(
                f"the parameters or optimiser state hold NaN or inf at step {step}; it was not saved. "
                f"{self.last_good_message()}")
        args = ocp.args.Composite(**{
            PARAMS_DIR: ocp.args.StandardSave(state["params"]),
            OPT_STATE: ocp.args.StandardSave(state["opt_state"]),
            META: ocp.args.JsonSave({"step": int(step)}),
            DATA: grain.checkpoint.CheckpointSave(data_iterator),
        })
        try:  # waits for the previous save to finish, which a storage that stopped answering never does
            return deadlines.with_deadline(lambda: self.manager.save(step, args=args, force=force),
                                           deadlines.timeout_s(), f"saving checkpoint step {step} to {self.directory}")
        except Exception as error:  # noqa: BLE001 - disk full, permissions, quota: one message
            raise self._save_failed(error) from None

    def check_for_errors(self) -> None:
        """Raises `CheckpointError` if a background save has failed since the last call."""
        try:
            self.manager.check_for_errors()
            if not self.manager.is_saving_in_progress():
                # Orbax keeps a failed background save's error on its finalize thread, which only
                # a wait re-raises; with no save in flight the wait returns at once.
                self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._save_failed(error) from None

    def _save_failed(self, error: BaseException) -> CheckpointError:
        if isinstance(error, deadlines.StorageTimeout):
            return CheckpointError(f"{error}; the run is stopped. {self.last_good_message()}")
        return CheckpointError(f"saving a checkpoint under {self.directory} failed "
                               f"({type(error).__name__}: {_first_line(error)}); the run is stopped. "
                               f"{self.last_good_message()}")

    def last_good_message(self) -> str:
        """Where a rerun resumes from, read from storage: a save in flight is not committed. The storage
        may be what failed (a bucket outage), so the listing has a short deadline and its failure is
        said, rather than replacing the message this sentence ends."""
        try:
            steps = deadlines.with_deadline(lambda: finished_steps(self.directory.parent),
                                            min(LISTING_DEADLINE_S, deadlines.timeout_s()),
                                            f"listing the checkpoints in {self.directory}")
        except Exception as error:  # noqa: BLE001 - whatever the listing met, the run's own message stands
            return (f"The checkpoints cannot be listed now ({_first_line(error)}); a rerun resumes from the "
                    f"newest one in {self.directory} that reads cleanly.")
        if not steps:
            return f"There is no earlier checkpoint in {self.directory}."
        return f"The last good checkpoint is step {steps[-1]} in {self.directory}; rerunning resumes from it."

    # ---- restoring -------------------------------------------------------------------------------

    def restore_latest_good(self, layout, data_iterator: Any, allow_fresh_start: bool = False
                            ) -> tuple[int, dict] | None:
        """(step, state) of the newest checkpoint that reads cleanly on every process, or None when
        there is none; the data iterator is set to that step's position.

        Every process reads a step on its own, then all agree on one verdict, the worst any of them
        reached (`_READ` < `_DAMAGED` < `_MISMATCH` < `_FAILED`). Only damage (`faults.DAMAGED`, on
        any process) moves a step aside and tries the next older one; a transient storage failure
        (after retries), a checkpoint that does not fit the configured model, or an unknown error
        stops the run, with the checkpoints left in place.
        A step whose optimiser state was written under other optimiser settings restores its
        parameters and carries over what still applies (`carry_over`). A workdir whose checkpoints
        all went aside does not silently train from step 0 again: that takes `allow_fresh_start`.
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            read, verdict, message = self._read_agreed(step, layout)
            if verdict == _READ:
                return step, self._restored_state(step, read, layout, data_iterator)
            if verdict != _DAMAGED:
                raise (CheckpointMismatchError if verdict == _MISMATCH else CheckpointError)(message)
            self._set_aside(step, message)
        self._check_fresh_start(allow_fresh_start)
        return None

    def _read_agreed(self, step: int, layout) -> tuple[Any, int, str]:
        """This process's read of `step`, and the verdict and message all processes agreed on."""
        read, verdict, message = None, _READ, ""
        what = f"reading checkpoint step {step} in {self.directory}"

        def attempt():
            return deadlines.with_deadline(lambda: self._read(step, layout), deadlines.timeout_s(), what)

        def on_retry(error: BaseException, delay: float) -> None:
            _warn(f"{what} failed ({_describe(faults.explain(error)[1])}); trying again in {delay:.0f} s")

        try:
            read = faults.retrying(attempt, on_retry)
        except CheckpointMismatchError as error:
            verdict, message = _MISMATCH, str(error)
        except Exception as error:  # noqa: BLE001 - classified: only damage moves a checkpoint
            verdict, message = _verdict(error, step, self.directory)
        if jax.process_count() > 1 and verdict != _READ:
            message = f"{message} (on process {jax.process_index()})"
        verdict, message = distributed.agree_on_worst(verdict, message)
        return read, verdict, message

    def _read(self, step: int, layout) -> _Read:
        """Everything of `step` this process needs, read without any collective."""
        directory = self.directory / str(step)
        self._check_shapes(step, self._array_reader.metadata(directory / PARAMS_DIR).tree, layout.abstract["params"])
        saved_opt = carry_over.describe(self._array_reader.metadata(directory / OPT_STATE).tree)
        wanted_opt = carry_over.describe(layout.abstract["opt_state"])
        params = self._restore_arrays(directory / PARAMS_DIR, _targets(layout.abstract["params"],
                                                                       layout.shardings["params"]))
        if saved_opt == wanted_opt:
            opt_state, matches = self._restore_arrays(directory / OPT_STATE, _targets(
                layout.abstract["opt_state"], layout.shardings["opt_state"])), None
        else:
            matches = carry_over.match_leaves(saved_opt, wanted_opt)
            opt_state = self._restore_matched(directory / OPT_STATE, matches, layout)
        meta = ocp.JsonCheckpointHandler().restore(directory / META, args=ocp.args.JsonRestore())
        return _Read(params, opt_state, matches, int(meta["step"]), read_data_iterator_state(directory / DATA))

    def _restore_arrays(self, directory, target):
        return self._state_reader.restore(directory, args=ocp.args.StandardRestore(target))

    def _restore_matched(self, directory, matches: dict, layout) -> dict:
        """{saved path: array} of the saved optimiser leaves that `matches` carries over."""
        wanted = {carry_over.path_names(path): (leaf, sharding) for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(layout.abstract["opt_state"])[0],
            jax.tree.leaves(layout.shardings["opt_state"]))}
        sharding_of_saved = {saved: wanted[new][1] for new, saved in matches.items()}

        def target(path, leaf):
            sharding = sharding_of_saved.get(carry_over.path_names(path))
            return ocp.PLACEHOLDER if sharding is None else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                                 sharding=sharding)

        tree = jax.tree_util.tree_map_with_path(target, self._array_reader.metadata(directory).tree)
        restore_args = jax.tree.map(lambda t: t if t is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
            sharding=t.sharding, global_shape=t.shape, dtype=t.dtype), tree)
        restored = self._array_reader.restore(directory, args=ocp.args.PyTreeRestore(item=tree,
                                                                                     restore_args=restore_args))
        flat = jax.tree_util.tree_flatten_with_path(restored)[0]
        named = ((carry_over.path_names(path), leaf) for path, leaf in flat)
        return {name: leaf for name, leaf in named if name in sharding_of_saved}

    def _restored_state(self, step: int, read: _Read, layout, data_iterator: Any) -> dict:
        """The train state of an agreed read (collective where it computes: every process runs it)."""
        opt_state = read.opt_state
        if read.matches is not None:
            opt_state = self._carried_opt_state(step, read, layout)
        data_iterator.set_state(read.data_state)
        if hasattr(data_iterator, "start_prefetch"):
            data_iterator.start_prefetch()
        step_array = jax.device_put(jnp.asarray(read.step, jnp.int32), layout.shardings["step"])
        return {"params": read.params, "opt_state": opt_state, "step": step_array}

    def _carried_opt_state(self, step: int, read: _Read, layout):
        """Fresh optimiser state for the current settings, with the saved arrays that still apply."""
        fresh = jax.jit(layout.optimizer.init, out_shardings=layout.shardings["opt_state"])(read.params)
        paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(fresh)
        leaves = []
        for path, leaf in paths_and_leaves:
            saved = read.matches.get(carry_over.path_names(path))
            leaves.append(leaf if saved is None else read.opt_state[saved])
        carried = sum(1 for path, _ in paths_and_leaves if carry_over.path_names(path) in read.matches)
        summary = (f"carried over all {carried} optimiser arrays" if carried == len(leaves) else
                   f"carried over {carried} of {len(leaves)} optimiser arrays and started the other "
                   f"{len(leaves) - carried} fresh")
        _warn(f"checkpoint step {step} in {self.directory} holds optimiser state for other optimiser settings "
              f"(an accepted config change): restored its parameters, {summary} (Adam moments and step counts "
              f"are carried where they still apply)")
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def _check_shapes(self, step: int, saved: dict, abstract_params: dict) -> None:
        for key, abstract in abstract_params.items():
            if key not in saved:
                raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} has no parameter {key}: "
                                              f"it was written for another model than config.model.name; nothing "
                                              f"was moved")
            if tuple(saved[key].shape) != tuple(abstract.shape):
                raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} holds {key} with shape "
                                              f"{list(saved[key].shape)}, but the configured model has "
                                              f"{list(abstract.shape)}: the model config changed; nothing was moved")

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves a step all processes found damaged out of Orbax's folder (process 0), never to be read again."""
        target = self.directory.parent / UNREADABLE_DIR / f"{step}-{int(time.time())}"
        failure = ""
        if jax.process_index() == 0:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                (self.directory / str(step)).rename(target)
                _warn(f"{reason}; moved it to {target} and trying the previous one")
            except Exception as error:  # noqa: BLE001 - every process must hear of it
                failure = (f"{reason}, but moving it out of {self.directory} failed ({_describe(error)}); "
                           f"move it by hand to {target.parent} and rerun")
        failed, failure = distributed.agree_on_worst(int(bool(failure)), failure)
        if failed:
            raise CheckpointError(failure)
        self.manager.reload()

    def _check_fresh_start(self, allow_fresh_start: bool) -> None:
        """Refuses to start from step 0 where earlier checkpoints were set aside as unreadable
        (on every process when any of them sees such a checkpoint)."""
        aside = paths.uncached(self.directory.parent / UNREADABLE_DIR)
        names = sorted(p.name for p in aside.iterdir()) if aside.is_dir() else []
        refusal = ""
        if names and not allow_fresh_start:
            refusal = (f"no checkpoint in {self.directory} reads cleanly, and {len(names)} unreadable one(s) were "
                       f"moved to {aside} ({', '.join(names)}): training would start again from step 0, so it did "
                       f"not; repair them, start a new workdir, or pass --allow-fresh-start to train from step 0 "
                       f"in this one")
        refused, refusal = distributed.agree_on_worst(int(bool(refusal)), refusal)
        if refused:
            raise CheckpointError(refusal)

    def restore(self, step: int, layout, data_iterator: Any) -> dict:
        """The state at `step`, laid out on the current mesh, without any fallback; the iterator is set."""
        return self._restored_state(step, self._read(step, layout), layout, data_iterator)

    # ---- the rest --------------------------------------------------------------------------------

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        try:
            deadlines.with_deadline(self.manager.wait_until_finished, deadlines.timeout_s(),
                                    f"finishing the checkpoint save under {self.directory}")
        except Exception as error:  # noqa: BLE001
            raise self._save_failed(error) from None

    def close(self) -> None:
        self.wait()
        self.manager.close()
        self._array_reader.close()
        self._state_reader.close()


def read_data_iterator_state(directory) -> dict:
    """The saved data-iterator state for this process, also when the number of hosts changed.

    Grain writes one `process_<i>-of-<n>.json` per host. The training pipeline's state
    counts global batches, which is the same on every host, so a run saved on n hosts
    resumes on any other number from host 0's file.
    """
    directory = epath.Path(directory)
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    other_layouts = sorted(p for p in directory.glob("process_0-of-*.json")
                           if not p.name.endswith(f"-of-{jax.process_count()}.json"))
    if own.exists():
        path = own
    elif other_layouts:
        path = other_layouts[0]
    else:
        raise FileNotFoundError(f"{directory} holds no data-iterator state for process {jax.process_index()} "
                                f"of {jax.process_count()}")
    return json.loads(path.read_text())


# Verdicts on one step, by severity: all processes act on the worst any of them reached.
_READ, _DAMAGED, _MISMATCH, _FAILED = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class _Read:
    params: dict
    opt_state: Any          # the train state's optimiser tree, or {saved path: array} when `matches` is set
    matches: dict | None    # {new path: saved path} when the optimiser settings changed (see carry_over)
    step: int
    data_state: dict


def _verdict(error: BaseException, step: int, directory) -> tuple[int, str]:
    """The verdict on a step whose read raised `error`, and the sentence that says so."""
    kind, cause = faults.explain(error)
    where = f"checkpoint step {step} in {directory}"
    if kind == faults.DAMAGED:
        return _DAMAGED, f"checkpoint step {step} is unreadable ({_describe(cause)})"
    if kind == faults.MISMATCH:
        return _MISMATCH, (f"{where} does not fit the configured train state ({_describe(cause)}); nothing was "
                           f"moved: resume under the config it was written with, or start a new workdir")
    if isinstance(error, deadlines.StorageTimeout):
        return _FAILED, f"{error}; {where} was left in place: rerun once the storage answers"
    if kind == faults.TRANSIENT:
        return _FAILED, (f"reading {where} failed {len(faults.RETRY_DELAYS_S) + 1} times ({_describe(cause)}); "
                         f"it was left in place: rerun once the storage answers")
    return _FAILED, (f"reading {where} failed ({_describe(error)}); it was left in place, since this is not "
                     f"known to be damage")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {_first_line(error)[:300]}"


def _targets(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        log.warning(message)
