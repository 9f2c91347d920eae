"""Zero-shot evaluation on the held-out species during training (placeholder until wired)."""

from __future__ import annotations


def eval_fn_from_config(config):
    return None
