"""A training workdir as the training loop leaves it, made in a second without training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

import bioclip_jax
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.models.params import flat_params
from bioclip_jax.pretrained import model_metadata


def trained_workdir(workdir: Path, step: int = 10, seed: int = 1) -> dict[str, np.ndarray]:
    """bioclip_jax_model.json and checkpoints/<step>/params written by a CheckpointManager (the loop's
    layout: _CHECKPOINT_METADATA per step, not inside params/); returns the saved parameters."""
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=seed)
    model_dir.write_model_json(str(workdir), *model_metadata(model))
    tree = {model_dir.path_to_key(p): np.asarray(v) for p, v in flat_params(model).items()}
    with ocp.CheckpointManager(Path(workdir) / model_dir.CHECKPOINTS_DIR,
                               item_handlers={model_dir.PARAMS_DIR: ocp.StandardCheckpointHandler()}) as manager:
        manager.save(step, args=ocp.args.Composite(**{model_dir.PARAMS_DIR: ocp.args.StandardSave(tree)}))
    return tree
