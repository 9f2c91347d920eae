"""Optimiser state across an accepted config change: which saved arrays still apply.

Changing an optimiser field (grad_clip_norm, freeze, accumulate_mode) changes the tree of
the optimiser state, not what most of its arrays mean: clipping puts the AdamW state one
level down ((clip, adamw) instead of adamw), freezing wraps it in a partition. A leaf of the
new tree takes the saved leaf whose path ends the same way -- the longest common tail of
path names, at least two of them (`0/mu/visual.proj`, `2/count`) -- when exactly one saved
leaf of the same shape and dtype ends that way. Every other leaf starts fresh: a new
accumulator, the moments of a tower that was frozen until now.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax

Leaf = tuple[tuple[int, ...], str]  # (shape, dtype name)
MIN_COMMON_TAIL = 2


def path_names(path: tuple) -> tuple[str, ...]:
    """("1", "0", "mu", "visual.proj") for a key path, whether it runs through namedtuple
    attributes (a live optax state) or dict keys (Orbax's metadata of the same state)."""
    names = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                names.append(str(getattr(key, attribute)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def describe(tree: Any) -> dict[tuple[str, ...], Leaf]:
    """{path names: (shape, dtype)} of every array leaf (arrays, ShapeDtypeStructs or Orbax metadata)."""
    return {path_names(path): (tuple(leaf.shape), str(leaf.dtype))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _common_tail(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def match_leaves(saved: Mapping[tuple[str, ...], Leaf], wanted: Mapping[tuple[str, ...], Leaf]
                 ) -> dict[tuple[str, ...], tuple[str, ...]]:
    """{wanted path: saved path} for the wanted leaves that a single saved leaf fits (see the module doc)."""
    matches = {}
    for path, leaf in wanted.items():
        tails = {}
        for saved_path, saved_leaf in saved.items():
            if saved_leaf == leaf:
                tails.setdefault(_common_tail(path, saved_path), []).append(saved_path)
        best = max(tails, default=0)
        if best >= MIN_COMMON_TAIL and len(tails[best]) == 1:
            matches[path] = tails[best][0]
    return matches
