"""Which activations a transformer block keeps for the backward pass (`config.remat`).

  none   keep everything: fastest, most memory
  full   keep each block's input only and recompute the block in the backward pass
  NAME   a `jax.checkpoint_policies` policy, e.g. `dots_with_no_batch_dims_saveable`: keep
         the weight matmuls' outputs, recompute attention scores, softmax, GELU and
         LayerNorm (most of full's saving for a fraction of its recomputation)

Every choice computes the same numbers; only memory and time differ.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax

NONE, FULL = "none", "full"


def policy_names() -> list[str]:
    """Members of `jax.checkpoint_policies` that are policies themselves; factories that build one
    (`save_only_these_names(...)`) take names rather than a primitive's `**params` and are left out."""
    def is_policy(fn) -> bool:
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return False
        return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    return sorted(name for name in dir(jax.checkpoint_policies)
                  if not name.startswith("_") and is_policy(getattr(jax.checkpoint_policies, name)))


def choices() -> list[str]:
    return [NONE, FULL, *policy_names()]


def check(value, field: str = "remat") -> str:
    """The choice as a name; True and False (the older on/off flag) mean full and none."""
    if value is True:
        return FULL
    if value is False or value is None:
        return NONE
    if value not in choices():
        raise ValueError(f"{field}={value!r} is not a remat choice; choose one of {', '.join(choices())}")
    return value


def checkpointed(fn: Callable, choice: str, *, in_scan: bool) -> Callable:
    """`fn` under `jax.checkpoint` with the choice's policy (unchanged for none).

    Inside `lax.scan` the loop boundary already keeps XLA from merging the recomputation
    back into the forward pass, so `prevent_cse` is off there, as big_vision and MaxText
    do; its optimisation barriers would only cost time.
    """
    if choice == NONE:
        return fn
    policy = None if choice == FULL else getattr(jax.checkpoint_policies, choice)
    return jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)
