"""Orbax checkpoints of a training run: parameters, optimiser state and data-iterator state.

All three are saved together under WORKDIR/checkpoints/<step>/ by one CheckpointManager
(async, keep-N). WORKDIR may be local or `gs://...` (etils.epath, as Orbax itself uses).
What a multi-day run relies on:
- Orbax writes each step into a temporary folder and commits it when complete, so a
  crash in the middle of a save leaves the previous step usable.
- A state holding NaN or inf is never saved (`NonFiniteStateError` instead).
- A failed background save is noticed at the next step (`check_for_errors`), not one
  interval later, and stops the run with one message.
- Restoring picks the newest step that reads cleanly; an unreadable one is moved aside
  to WORKDIR/checkpoints_unreadable/ (never deleted) and named in one line.
- Restoring takes the abstract state with the *current* mesh's shardings, so a run saved
  on 8 devices restores onto 4 (or onto another host count).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from bioclip_jax.checkpoint.model_dir import CHECKPOINTS_DIR, PARAMS_DIR, finished_steps
from bioclip_jax.paths import absolute

OPT_STATE = "opt_state"
DATA = "data"
META = "meta"
UNREADABLE_DIR = "checkpoints_unreadable"


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
        try:
            return self.manager.save(step, args=args, force=force)
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
        return CheckpointError(f"saving a checkpoint under {self.directory} failed "
                               f"({type(error).__name__}: {_first_line(error)}); the run is stopped. "
                               f"{self.last_good_message()}")

    def last_good_message(self) -> str:
        steps = finished_steps(self.directory.parent)  # committed on storage, not a save in flight
        if not steps:
            return f"There is no earlier checkpoint in {self.directory}."
        return f"The last good checkpoint is step {steps[-1]} in {self.directory}; rerunning resumes from it."

    # ---- restoring -------------------------------------------------------------------------------

    def restore_latest_good(self, abstract_state: dict, shardings: dict, data_iterator: Any
                            ) -> tuple[int, dict] | None:
        """(step, state) of the newest checkpoint that reads cleanly, or None when there is none.

        A checkpoint that fails to read is moved aside and the next older one is tried.
        A checkpoint that reads but does not fit the configured model is a config problem,
        not a damaged file: that raises CheckpointMismatchError and nothing is moved.
        """
        tried = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self._check_shapes(step, abstract_state["params"])
                return step, self.restore(step, abstract_state, shardings, data_iterator)
            except CheckpointMismatchError:
                raise
            except Exception as error:  # noqa: BLE001 - a damaged checkpoint: fall back to an older one
                tried.append(step)
                self._set_aside(step, error)
        if tried:
            raise CheckpointError(f"no checkpoint in {self.directory} reads cleanly (steps {tried} were moved "
                                  f"to {self.directory.parent / UNREADABLE_DIR}); start a new workdir or "
                                  f"repair them")
        return None

    def _check_shapes(self, step: int, abstract_params: dict) -> None:
        saved = self.manager.item_metadata(step)[PARAMS_DIR]
        if saved is None:
            raise CheckpointError(f"step {step} has no parameter metadata")
        for key, abstract in abstract_params.items():
            if key not in saved:
                raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} has no parameter {key}: it was "
                                 f"written for another model than config.model.name")
            if tuple(saved[key].shape) != tuple(abstract.shape):
                raise CheckpointMismatchError(f"checkpoint step {step} in {self.directory} holds {key} with shape "
                                 f"{list(saved[key].shape)}, but the configured model has "
                                 f"{list(abstract.shape)}: the model config changed")

    def _set_aside(self, step: int, error: BaseException) -> None:
        """Moves an unreadable step out of Orbax's folder (process 0), so that it is never read again."""
        target = self.directory.parent / UNREADABLE_DIR / f"{step}-{int(time.time())}"
        if jax.process_index() == 0:
            print(f"checkpoint step {step} is unreadable ({type(error).__name__}: {_first_line(error)[:300]}); "
                  f"moved it to {target} and trying the previous one", file=sys.stderr, flush=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def restore(self, step: int, abstract_state: dict, shardings: dict, data_iterator: Any) -> dict:
        """The state at `step`, laid out on the current mesh; the iterator is restored in place."""
        def target(tree, tree_shardings):
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                tree, tree_shardings)

        restored = self.manager.restore(step, args=ocp.args.Composite(**{
            PARAMS_DIR: ocp.args.StandardRestore(target(abstract_state["params"], shardings["params"])),
            OPT_STATE: ocp.args.StandardRestore(target(abstract_state["opt_state"], shardings["opt_state"])),
            META: ocp.args.JsonRestore(),
        }))
        restore_data_iterator(self.directory / str(step) / DATA, data_iterator)
        step_array = jax.device_put(jnp.asarray(restored[META]["step"], jnp.int32), shardings["step"])
        return {"params": restored[PARAMS_DIR], "opt_state": restored[OPT_STATE], "step": step_array}

    # ---- the rest --------------------------------------------------------------------------------

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as error:  # noqa: BLE001
            raise self._save_failed(error) from None

    def close(self) -> None:
        self.wait()
        self.manager.close()


def restore_data_iterator(directory, data_iterator: Any) -> None:
    """Sets the iterator to the saved position, also when the number of hosts changed.

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
    data_iterator.set_state(json.loads(path.read_text()))
    if hasattr(data_iterator, "start_prefetch"):
        data_iterator.start_prefetch()
