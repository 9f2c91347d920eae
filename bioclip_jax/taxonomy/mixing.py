"""Chooses which caption type each training sample uses at each step.

Every choice is a pure function of (seed, step, position in the global batch), so
all hosts agree without talking to each other, a resumed run repeats the same
choices, and the result does not depend on how the global batch is split across
hosts. Randomness comes from numpy generators seeded with fixed-width words of
those counters (SeedSequence would silently merge trailing zeros and split large
ints, so the words are laid out explicitly).
"""

from __future__ import annotations

import math
import operator
from typing import Any, Mapping, Sequence

import numpy as np

from bioclip_jax.taxonomy.text_types import RANDOM_POOL, TEXT_TYPES, check_text_type

MODES = ("fixed", "random", "per_sample", "weighted")

# Per-sample draws take one generator per block of global positions, which keeps a
# 32k batch to a few dozen generators yet leaves each position's draw independent
# of which other positions a host asks for.
_BLOCK = 1024
_STREAM_PER_BATCH = 0
_STREAM_PER_SAMPLE = 1


def _counter(name: str, value: Any) -> int:
    """A non-negative int below 2**64 (seeds, steps and positions are seeded verbatim)."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if not 0 <= number < 2**64:
        raise ValueError(f"{name} must be in [0, 2**64), got {number}")
    return number


def _words(*counters: int) -> list[int]:
    """Each counter as two 32-bit words, so distinct counter tuples never share a seed."""
    return [word for c in counters for word in (c & 0xFFFFFFFF, c >> 32)]


def _parse_weights(spec: str | Mapping[str, Any]) -> dict[str, float]:
    """`{"sci": 1, "com": 3}` or "sci:1,com:3" -> positive weights summing to 1."""
    if isinstance(spec, str):
        pairs = []
        for item in spec.split(","):
            name, sep, weight = item.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"text type mix {spec!r}: expected 'type:weight' entries, got {item!r}")
            pairs.append((name.strip(), weight.strip()))
        names = [name for name, _ in pairs]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"text type mix {spec!r} names {repeated} more than once")
    else:
        pairs = list(spec.items())
    weights = {}
    for name, weight in pairs:
        check_text_type(name)
        try:
            value = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"text type mix: weight of {name!r} is not a number: {weight!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"text type mix: weight of {name!r} must be finite and >= 0, got {weight!r}")
        if value > 0:
            weights[name] = value
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"text type mix {spec!r} has no positive weight")
    return {name: value / total for name, value in weights.items()}


def _parse_spec(spec: Any) -> tuple[str, dict[str, float]]:
    """Returns (mode, type -> probability)."""
    if hasattr(spec, "items"):  # dicts, and ml_collections ConfigDicts from a config file
        return "weighted", _parse_weights(spec)
    if not isinstance(spec, str):
        raise TypeError(f"text type spec must be a string or a mapping, got {type(spec).__name__}")
    spec = spec.strip()
    uniform = {name: 1 / len(RANDOM_POOL) for name in RANDOM_POOL}
    if spec == "random":
        return "random", uniform
    if spec == "per_sample":
        return "per_sample", uniform
    if ":" in spec:
        return "weighted", _parse_weights(spec)
    if spec in TEXT_TYPES:
        return "fixed", {spec: 1.0}
    raise ValueError(
        f"unknown text type spec {spec!r}; valid: one of {', '.join(TEXT_TYPES)}, "
        "'random', 'per_sample', or a mix like 'sci:0.5,taxon_com:0.5'"
    )


class TextTypeSampler:
    """Stateless text-type schedule: fixed, per-batch random, per-sample random, or a weighted mix."""

    def __init__(self, spec: str | Mapping[str, Any], seed: int = 0):
        self.seed = _counter("seed", seed)
        self.mode, self.probabilities = _parse_spec(spec)
        self.types = tuple(self.probabilities)
        cumulative = np.cumsum([self.probabilities[name] for name in self.types])
        cumulative[-1] = 1.0  # round-off must never leave a draw past the last type
        self._cumulative = cumulative

    @property
    def per_batch(self) -> bool:
        """True when the whole global batch shares one text type at each step."""
        return self.mode in ("fixed", "random")

    def type_for_step(self, step: int) -> str:
        """The text type of the whole global batch at `step` (per-batch modes only)."""
        step = _counter("step", step)
        if self.mode == "fixed":
            return self.types[0]
        if self.mode != "random":
            raise ValueError(f"text type mode {self.mode!r} draws per sample; use types_for_batch")
        draw = np.random.default_rng(_words(_STREAM_PER_BATCH, self.seed, step)).random()
        return self._pick(np.array([draw]))[0]

    def types_for_batch(self, step: int, global_indices: Sequence[int] | np.ndarray) -> list[str]:
        """One text type per sample of this host's part of the batch, given global batch positions."""
        indices = self._check_indices(global_indices)
        if self.per_batch:
            return [self.type_for_step(step)] * len(indices)
        step = _counter("step", step)
        return self._pick(self._uniforms(step, indices))

    def _pick(self, uniforms: np.ndarray) -> list[str]:
        chosen = np.searchsorted(self._cumulative, uniforms, side="right")
        return [self.types[i] for i in np.minimum(chosen, len(self.types) - 1)]

    def _uniforms(self, step: int, indices: np.ndarray) -> np.ndarray:
        """A uniform draw in [0, 1) per global position, a function of (seed, step, position) only."""
        out = np.empty(len(indices))
        blocks = indices // _BLOCK
        for block in np.unique(blocks):
            entropy = _words(_STREAM_PER_SAMPLE, self.seed, step, int(block))
            stream = np.random.default_rng(entropy).random(_BLOCK)
            in_block = blocks == block
            out[in_block] = stream[indices[in_block] % _BLOCK]
        return out

    @staticmethod
    def _check_indices(global_indices: Sequence[int] | np.ndarray) -> np.ndarray:
        indices = np.asarray(global_indices)
        if indices.size == 0:
            return np.zeros(0, dtype=np.int64)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(
                f"global_indices must be a 1-D sequence of integers, got shape {indices.shape} "
                f"dtype {indices.dtype}"
            )
        if indices.min() < 0:
            raise ValueError(f"global_indices must be >= 0, got {int(indices.min())}")
        return indices.astype(np.int64)

    def __repr__(self) -> str:
        mix = ", ".join(f"{name}: {p:.3g}" for name, p in self.probabilities.items())
        return f"TextTypeSampler(mode={self.mode!r}, seed={self.seed}, {{{mix}}})"
