"""Orbax checkpoints of a training run: parameters, optimiser state and data-iterator state.

All three are saved together under WORKDIR/checkpoints/<step>/ by one CheckpointManager
(async, keep-N). Orbax writes each step into a temporary folder and renames it when
complete, so a crash in the middle of a save leaves the previous step usable. Restoring
takes the abstract state with the *current* mesh's shardings, so a run saved on 8
devices restores onto 4 (or onto another host count).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from bioclip_jax.checkpoint.model_dir import CHECKPOINTS_DIR, PARAMS_DIR

OPT_STATE = "opt_state"
DATA = "data"
META = "meta"


class TrainCheckpointer:
    def __init__(self, workdir: str, every_steps: int, keep: int, async_save: bool = True):
        if every_steps <= 0:
            raise ValueError(f"checkpoint.every_steps must be positive, got {every_steps}")
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS_DIR))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps, max_to_keep=keep, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(PARAMS_DIR, OPT_STATE, META, DATA))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iterator: Any, force: bool = False) -> bool:
        if not force and not self.manager.should_save(step):
            return False
        args = ocp.args.Composite(**{
            PARAMS_DIR: ocp.args.StandardSave(state["params"]),
            OPT_STATE: ocp.args.StandardSave(state["opt_state"]),
            META: ocp.args.JsonSave({"step": int(step)}),
            DATA: grain.checkpoint.CheckpointSave(data_iterator),
        })
        return self.manager.save(step, args=args, force=force)

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
        restore_data_iterator(os.path.join(self.directory, str(step), DATA), data_iterator)
        step_array = jax.device_put(jax.numpy.asarray(restored[META]["step"], jax.numpy.int32),
                                    shardings["step"])
        return {"params": restored[PARAMS_DIR], "opt_state": restored[OPT_STATE], "step": step_array}

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_data_iterator(directory: str, data_iterator: Any) -> None:
    """Sets the iterator to the saved position, also when the number of hosts changed.

    Grain writes one `process_<i>-of-<n>.json` per host. The training pipeline's state
    counts global batches, which is the same on every host, so a run saved on n hosts
    resumes on any other number from host 0's file.
    """
    own = os.path.join(directory, f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    other_layouts = [p for p in glob.glob(os.path.join(directory, "process_0-of-*.json"))
                     if not p.endswith(f"-of-{jax.process_count()}.json")]
    if os.path.exists(own):
        path = own
    elif other_layouts:
        path = other_layouts[0]
    else:
        raise FileNotFoundError(f"{directory} holds no data-iterator state for process {jax.process_index()} "
                                f"of {jax.process_count()}")
    with open(path, encoding="utf-8") as f:
        data_iterator.set_state(json.loads(f.read()))
    if hasattr(data_iterator, "start_prefetch"):
        data_iterator.start_prefetch()
