"""Which activations a transformer block keeps for the backward pass (`config.remat`).

  none   keep everything: fastest, most memory
  full   keep each block's input only and recompute the block in the backward pass
  minimal
         keep the outputs of the block's weight matmuls (q/k/v, attention context and output,
         MLP hidden and output), recompute LayerNorm, attention and GELU: the matmuls are
         never recomputed (MaxText's "minimal" policy)
  save:NAME[,NAME...]
         keep only these named activations (`bioclip_jax.models.layers.MATMUL_OUTPUTS`)
  NAME   a `jax.checkpoint_policies` policy, e.g. `dots_with_no_batch_dims_saveable`

Every choice computes the same numbers; only memory and time differ.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax

NONE, FULL, MINIMAL = "none", "full", "minimal"
SAVE_PREFIX = "save:"
# The names `bioclip_jax.models.layers` gives its weight-matmul outputs (its MATMUL_OUTPUTS;
# kept here as data so that this module needs nothing from the layers it configures).
SAVEABLE_NAMES = ("qkv", "attention_context", "attention_out", "mlp_hidden", "mlp_out")


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
    return [NONE, FULL, MINIMAL, f"{SAVE_PREFIX}{','.join(SAVEABLE_NAMES[:2])}", *policy_names()]


def saved_names(choice: str) -> tuple[str, ...] | None:
    """The activation names a named-save choice keeps (None for any other choice)."""
    if choice == MINIMAL:
        return SAVEABLE_NAMES
    if isinstance(choice, str) and choice.startswith(SAVE_PREFIX):
        return tuple(name.strip() for name in choice[len(SAVE_PREFIX):].split(",") if name.strip())
    return None


def check(value, field: str = "remat") -> str:
    """The choice as a name; True and False (the older on/off flag) mean full and none."""
    if value is True:
        return FULL
    if value is False or value is None:
        return NONE
    names = saved_names(value)
    if names is not None:
        unknown = [name for name in names if name not in SAVEABLE_NAMES]
        if unknown or not names:
            raise ValueError(f"{field}={value!r} must name activations to keep among {', '.join(SAVEABLE_NAMES)}"
                             f"{' (not ' + ', '.join(unknown) + ')' if unknown else ''}")
        return value
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
    names = saved_names(choice)
    if names is not None:
        policy = jax.checkpoint_policies.save_only_these_names(*names)
    else:
        policy = None if choice == FULL else getattr(jax.checkpoint_policies, choice)
    return jax.checkpoint(fn, policy=policy, prevent_cse=not in_scan)
