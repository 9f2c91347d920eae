"""A bioclip_jax model directory: architecture + preprocessing JSON and Orbax parameters.

Layout:
  DIR/bioclip_jax_model.json    {"model_cfg": <open_clip model_cfg>, "preprocess_cfg": {...}}
  DIR/params/                   Orbax checkpoint of {"visual.transformer.blocks.attn.query": [layers, ...], ...}
A training workdir has the same JSON and, instead of `params/`, an Orbax
CheckpointManager folder `checkpoints/<step>/params` (and `metrics.jsonl`); loading
picks the latest finished step unless told which. DIR may be local or a bucket (`gs://...`, see bioclip_jax.paths).
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any, Mapping

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from bioclip_jax import paths

MODEL_JSON = "bioclip_jax_model.json"
PARAMS_DIR = "params"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
CONFIG_JSON = "config.json"  # a training run's config as the trainer recorded it (train/run_identity.py)


def path_to_key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def key_to_path(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("."))


def write_model_json(directory: paths.PathLike, model_cfg: dict, preprocess_cfg: dict) -> None:
    directory = epath.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths.write_atomically(directory / MODEL_JSON,
                           json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2))


def read_model_json(directory: paths.PathLike) -> dict[str, Any]:
    return paths.read_json(epath.Path(directory) / MODEL_JSON)


def is_model_dir(directory: paths.PathLike) -> bool:
    return (epath.Path(directory) / MODEL_JSON).is_file()


def save_params(directory: paths.PathLike, params: Mapping[tuple, Any]) -> None:
    """Orbax commits the folder only when complete, so a crash leaves no half checkpoint."""
    tree = {path_to_key(p): np.asarray(v) for p, v in params.items()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(paths.absolute(directory) / PARAMS_DIR, tree, force=True)


def finished_steps(directory: paths.PathLike) -> list[int]:
    """Steps of a training workdir whose checkpoint is complete, ascending.

    Orbax's rule for "complete" (a renamed folder locally, a commit_success.txt in a
    bucket), from a fresh listing: another process may have written a step since.
    """
    root = paths.uncached(paths.absolute(directory) / CHECKPOINTS_DIR)
    return sorted(step for step in ocp.path.step.checkpoint_steps(root) if (root / str(step) / PARAMS_DIR).is_dir())


def latest_step_dir(directory: paths.PathLike) -> str | None:
    steps = finished_steps(directory)
    return str(epath.Path(directory) / CHECKPOINTS_DIR / str(steps[-1])) if steps else None


def params_dir(directory: paths.PathLike, step: int | None = None) -> epath.Path:
    """DIR/params of a model directory, or WORKDIR/checkpoints/<step>/params (default: the latest)."""
    root = paths.uncached(paths.absolute(directory))
    if step is None and (root / PARAMS_DIR).is_dir():
        return root / PARAMS_DIR
    steps = finished_steps(root)
    if step is None:
        if not steps:
            raise FileNotFoundError(f"{directory} has neither {PARAMS_DIR}/ nor a finished checkpoint "
                                    f"under {CHECKPOINTS_DIR}/")
        step = steps[-1]
    elif step not in steps:
        available = ", ".join(map(str, steps)) or "none"
        raise FileNotFoundError(f"{directory} has no finished checkpoint at step {step} (available steps: {available})")
    return root / CHECKPOINTS_DIR / str(step) / PARAMS_DIR


class _ItemMetadataIsOneLevelUp(logging.Filter):
    """A CheckpointManager keeps _CHECKPOINT_METADATA in checkpoints/<step>/, beside its items; Orbax,
    reading the params item on its own, warns (through absl) on every load that params/ lacks one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "Metadata file does not exist: %s" and record.args
                    and epath.Path(str(record.args[0])).parent.name == PARAMS_DIR)


@contextlib.contextmanager
def _reading_params():
    """A PyTreeCheckpointer for params/, without Orbax's warning about the step-level metadata file."""
    absl_logger, quiet = logging.getLogger("absl"), _ItemMetadataIsOneLevelUp()
    absl_logger.addFilter(quiet)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            yield checkpointer
    finally:
        absl_logger.removeFilter(quiet)


def param_keys(directory: paths.PathLike, step: int | None = None) -> list[str]:
    """The parameter keys saved in a model directory or workdir checkpoint (metadata only, no arrays)."""
    with _reading_params() as checkpointer:
        return sorted(checkpointer.metadata(params_dir(directory, step)).item_metadata.tree)


def load_params(directory: paths.PathLike, step: int | None = None) -> dict[tuple, np.ndarray]:
    """Parameters of a model directory, or of a training workdir's checkpoint at `step` (default: latest).

    Every leaf is restored as a host numpy array, whatever devices or processes wrote it:
    without an explicit target Orbax would rebuild the saved sharding and refuse a
    checkpoint from 8 devices (or 2 processes) in a 1-device process ("Topology mismatch").
    """
    source = params_dir(directory, step)
    with _reading_params() as checkpointer:
        saved = checkpointer.metadata(source).item_metadata.tree
        as_numpy = {key: ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype) for key, leaf in saved.items()}
        tree = checkpointer.restore(source, args=ocp.args.PyTreeRestore(restore_args=as_numpy))
    return {key_to_path(k): np.asarray(v) for k, v in tree.items()}
