"""AdamW + learning-rate schedule as in open_clip's training script (the BioCLIP recipe).

open_clip puts gains, biases, `logit_scale` and every parameter with fewer than two
dimensions in a group without weight decay; `weight_decay_mask` reproduces that rule
from NNX State paths. The schedules reproduce `open_clip_train/scheduler.py` value for
value; note its warm-up is `lr * (step + 1) / warmup`, so step 0 already trains.
Steps count optimiser updates. `optimizer.accumulate_mode` says what
`accumulate_steps = k` means:
  "global_negatives" (default): one train-step call takes the whole global batch and
      splits it into k micro-batches inside the step (train/accumulation.py), with every
      negative of the batch in the loss; one call = one update.
  "independent_microbatches": optax MultiSteps averages the gradients of k calls, each
      on its own batch with only its own negatives. For a contrastive loss that is a
      different objective (k times fewer negatives), not the large-batch recipe.
`optimizer.freeze` = "image" | "text" holds one tower fixed while the other fine-tunes, as
open_clip's `--lock-image` / `--lock-text` do (LiT): the frozen parameters go through
`optax.set_to_zero` inside an `optax.multi_transform`, so they never change and carry no
Adam moments (no optimiser memory). `logit_scale` / `logit_bias` belong to neither tower
and keep training, as in open_clip.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bioclip_jax.models.layers import STACKED_BLOCKS

OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "constant", "const-cooldown")
NO_DECAY_NAME_PARTS = ("bn", "ln", "bias", "logit_scale")
ACCUMULATE_MODES = ("global_negatives", "independent_microbatches")
FREEZE_CHOICES = ("", "image", "text")
TOWER_PREFIXES = {"image": "visual.", "text": "text."}  # parameter-name prefix of each tower
TRAINED, FROZEN = "trained", "frozen"


def _config_value(section: ml_collections.ConfigDict, key: str, default: Any, where: str) -> Any:
    """Reads an optional field, so older configs keep working when fields are added."""
    if section is None:
        raise ValueError(f"config has no '{where}' section.")
    return section.get(key, default) if hasattr(section, "get") else getattr(section, key, default)


def key_path_names(path: tuple) -> tuple:
    """Key path -> plain names, without the `.value` step of NNX Variables.

    Dropping `.value` makes paths of an NNX State, of its pure-dict form and of optax
    states built from either comparable.
    """
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(key.key)
        elif isinstance(key, jax.tree_util.GetAttrKey):
            if key.name != "value":
                names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(key.idx)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            names.append(key.key)
        else:
            names.append(str(key))
    return tuple(names)


def _path_name(path: tuple) -> str:
    """'visual.ln_pre.scale'-style name of a key path, comparable to open_clip parameter names."""
    return ".".join(str(name) for name in key_path_names(path))


def decays_weight(name: str, ndim: int) -> bool:
    """open_clip's rule: no decay for ndim < 2 or names containing 'bn', 'ln', 'bias', 'logit_scale'.

    `ndim` counts the dimensions of one open_clip tensor, so the leading [layers] axis of
    stacked transformer-block parameters is not counted.
    """
    if f".{STACKED_BLOCKS}." in f".{name}.":
        ndim -= 1
    return ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def weight_decay_mask(params: Any) -> Any:
    """A pytree of bools, like `params`: True where AdamW weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: decays_weight(_path_name(path), jnp.ndim(leaf)), params)


def frozen_tower(config: ml_collections.ConfigDict) -> str:
    """`optimizer.freeze`, checked: "" (train everything), "image" or "text"."""
    freeze = _config_value(config.get("optimizer"), "freeze", "", "optimizer") or ""
    if freeze not in FREEZE_CHOICES:
        raise ValueError(f"optimizer.freeze {freeze!r} is unknown; choose one of {FREEZE_CHOICES} "
                         f"('' trains both towers).")
    return freeze


def is_frozen(name: str, freeze: str) -> bool:
    """Whether parameter `name` ('visual.proj', 'text.token_embedding', ...) belongs to the frozen tower."""
    return bool(freeze) and name.startswith(TOWER_PREFIXES[freeze])


def freeze_labels(params: Any, freeze: str) -> Any:
    """A pytree of "trained" / "frozen" labels, like `params`, for `optax.multi_transform`."""
    def label(path, _):
        return FROZEN if is_frozen(_path_name(path), freeze) else TRAINED

    labels = jax.tree_util.tree_map_with_path(label, params)
    if freeze and FROZEN not in jax.tree_util.tree_leaves(labels):
        raise ValueError(f"optimizer.freeze={freeze!r} matches no parameter (names starting with "
                         f"{TOWER_PREFIXES[freeze]!r}); nothing would be frozen.")
    return labels


def _warmup(lr: float, warmup_steps: int, step: jax.Array) -> jax.Array:
    return lr * (step + 1) / warmup_steps


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Learning rate per optimiser step: linear warm-up, then cosine to 0, constant, or constant + cool-down.

    Fields: `optimizer.lr`, `schedule.name`, `schedule.warmup_steps`, and for
    "const-cooldown" `schedule.cooldown_steps`, `schedule.cooldown_power` (1 = linear),
    `schedule.cooldown_end_lr`.
    """
    lr = _config_value(config.get("optimizer"), "lr", None, "optimizer")
    if lr is None:
        raise ValueError("config.optimizer.lr is not set.")
    lr = float(lr)
    schedule_config = config.get("schedule")
    name = _config_value(schedule_config, "name", "cosine", "schedule")
    warmup_steps = int(_config_value(schedule_config, "warmup_steps", 0, "schedule"))
    if name not in SCHEDULES:
        raise ValueError(f"schedule.name {name!r} is unknown; choose one of {SCHEDULES}.")
    if total_steps <= warmup_steps and name != "constant":
        raise ValueError(f"total_steps {total_steps} must exceed schedule.warmup_steps {warmup_steps}.")
    cooldown_steps = int(_config_value(schedule_config, "cooldown_steps", 0, "schedule"))
    cooldown_power = float(_config_value(schedule_config, "cooldown_power", 1.0, "schedule"))
    cooldown_end_lr = float(_config_value(schedule_config, "cooldown_end_lr", 0.0, "schedule"))
    if name == "const-cooldown" and not 0 < cooldown_steps <= total_steps - warmup_steps:
        raise ValueError(
            f"schedule.cooldown_steps {cooldown_steps} must be in (0, total_steps - warmup_steps = "
            f"{total_steps - warmup_steps}] for the const-cooldown schedule."
        )

    def after_warmup(step: jax.Array) -> jax.Array:
        if name == "constant":
            return jnp.full_like(step, lr)
        if name == "cosine":
            progress = (step - warmup_steps) / (total_steps - warmup_steps)
            return 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * lr
        cooldown_start = total_steps - cooldown_steps
        progress = jnp.clip((step - cooldown_start) / cooldown_steps, 0.0, None)
        cooled = (1.0 - progress) ** cooldown_power * (lr - cooldown_end_lr) + cooldown_end_lr
        return jnp.where(step < cooldown_start, lr, cooled)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if warmup_steps == 0:
            return after_warmup(step)
        return jnp.where(step < warmup_steps, _warmup(lr, warmup_steps, step), after_warmup(step))

    return schedule


def accumulation(config: ml_collections.ConfigDict) -> tuple[int, str]:
    """(accumulate_steps, accumulate_mode), checked; older configs without the mode get the default."""
    opt = config.get("optimizer")
    steps = _config_value(opt, "accumulate_steps", 1, "optimizer")
    steps = 1 if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"optimizer.accumulate_steps must be >= 1, got {steps}.")
    mode = _config_value(opt, "accumulate_mode", ACCUMULATE_MODES[0], "optimizer")
    if mode not in ACCUMULATE_MODES:
        raise ValueError(f"optimizer.accumulate_mode {mode!r} is unknown; choose one of {ACCUMULATE_MODES}.")
    return steps, mode


def batches_per_update(config: ml_collections.ConfigDict) -> int:
    """Train-step calls per optimiser update: k under MultiSteps ("independent_microbatches"), else 1."""
    steps, mode = accumulation(config)
    return steps if mode == "independent_microbatches" else 1


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping (optional) -> AdamW with masked decay; in MultiSteps for independent micro-batches.

    Fields: `optimizer.{name, lr, b1, b2, eps, weight_decay, grad_clip_norm, accumulate_steps,
    accumulate_mode, freeze}`. Under "independent_microbatches" the gradients of k train-step
    calls (each batch with its own negatives) are averaged before one update; under
    "global_negatives" the train step accumulates by itself and the optimiser is plain. With a
    frozen tower, clipping and AdamW see only the trained parameters (the global norm leaves
    the frozen gradients out, as open_clip's does, whose frozen tensors have no gradient).
    """
    opt = config.get("optimizer")
    name = _config_value(opt, "name", "adamw", "optimizer")
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name {name!r} is unknown; choose one of {OPTIMIZERS}.")
    grad_clip_norm = _config_value(opt, "grad_clip_norm", None, "optimizer")
    calls_per_update = batches_per_update(config)
    if grad_clip_norm is not None and grad_clip_norm < 0:
        raise ValueError(f"optimizer.grad_clip_norm must be >= 0 (0 or None disables it), got {grad_clip_norm}.")
    grad_clip_norm = grad_clip_norm or None

    adamw = optax.adamw(
        learning_rate=make_schedule(config, total_steps),
        b1=float(_config_value(opt, "b1", 0.9, "optimizer")),
        b2=float(_config_value(opt, "b2", 0.98, "optimizer")),
        eps=float(_config_value(opt, "eps", 1e-6, "optimizer")),
        weight_decay=float(_config_value(opt, "weight_decay", 0.2, "optimizer")),
        mask=weight_decay_mask,
    )
    tx = adamw if grad_clip_norm is None else optax.chain(optax.clip_by_global_norm(float(grad_clip_norm)), adamw)
    if calls_per_update > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=calls_per_update).gradient_transformation()
    freeze = frozen_tower(config)
    if freeze:  # outermost, so no state of any inner transformation (moments, accumulators) covers the frozen tower
        tx = optax.multi_transform({TRAINED: tx, FROZEN: optax.set_to_zero()},
                                   lambda params: freeze_labels(params, freeze))
    return tx
