"""Flat views of a model's parameters: {path tuple: array}, the common currency of I/O."""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx


def flat_params(model_or_state) -> dict[tuple, jax.Array]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
    return {tuple(path): var.get_value() if hasattr(var, "get_value") else var.value
            for path, var in nnx.to_flat_state(state)}


def param_shapes(model_or_state) -> dict[tuple, tuple[int, ...]]:
    return {path: tuple(value.shape) for path, value in flat_params(model_or_state).items()}


def assign_params(model: nnx.Module, values: Mapping[tuple, np.ndarray], source: str = "checkpoint") -> None:
    """Writes `values` into `model`, which must have exactly these parameter paths and shapes."""
    state = nnx.state(model, nnx.Param)
    flat = list(nnx.to_flat_state(state))
    missing = [p for p, _ in flat if tuple(p) not in values]
    if missing:
        raise ValueError(f"{source} lacks {len(missing)} parameter(s), e.g. {'/'.join(map(str, missing[0]))}")
    for path, var in flat:
        new = np.asarray(values[tuple(path)])
        if new.shape != var.value.shape:
            raise ValueError(f"shape mismatch for {'/'.join(map(str, path))} in {source}: "
                             f"{list(new.shape)} vs the model's {list(var.value.shape)}")
        var.value = jax.numpy.asarray(new, dtype=var.value.dtype)
    nnx.update(model, nnx.from_flat_state(flat))
