"""The one table between bioclip_jax parameter paths and open_clip state_dict keys.

Every entry says how a tensor moves between the two layouts. Only transposes,
reshapes, splits, concatenations and (for transformer blocks, which bioclip_jax stores
stacked as [layers, ...]) indexing and stacking are used, so import followed by export
gives back the original tensors bit for bit.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from bioclip_jax.models.config import CLIPConfig
from bioclip_jax.models.layers import STACKED_BLOCKS

Path = tuple  # an NNX state path such as ("visual", "transformer", "blocks", "attn", "query")
ToJax = Callable[[np.ndarray, list[tuple[int, ...]]], list[np.ndarray]]
ToTorch = Callable[[list[np.ndarray]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Rule:
    torch_key: str
    jax_paths: tuple[Path, ...]
    to_jax: ToJax      # torch tensor + target shapes -> one array per jax path
    to_torch: ToTorch  # arrays of the jax paths -> torch tensor
    layer: int | None = None  # for stacked block parameters: which [layer] of each jax path


def _same(t, shapes):
    return [t]


def _same_back(arrays):
    return arrays[0]


def _linear(t, shapes):
    """torch Linear weight [out, in] -> kernel [in, ...]: transpose, then split trailing dims."""
    return [t.T.reshape(shapes[0])]


def _kernel_in_first(arrays):
    """kernel [in, heads, head_dim] -> torch [out, in]."""
    kernel = arrays[0]
    return kernel.reshape(kernel.shape[0], -1).T


def _kernel_out_last(arrays):
    """kernel [heads, head_dim, out] -> torch [out, in]."""
    kernel = arrays[0]
    return kernel.reshape(-1, kernel.shape[-1]).T


def _fused_qkv(t, shapes):
    return [part.T.reshape(shape) for part, shape in zip(np.split(t, 3, axis=0), shapes)]


def _fused_qkv_back(arrays):
    return np.concatenate([k.reshape(k.shape[0], -1).T for k in arrays], axis=0)


def _fused_qkv_bias(t, shapes):
    return [part.reshape(shape) for part, shape in zip(np.split(t, 3), shapes)]


def _fused_qkv_bias_back(arrays):
    return np.concatenate([b.reshape(-1) for b in arrays])


def _reshape(t, shapes):
    return [t.reshape(shapes[0])]


def _flatten(arrays):
    return arrays[0].reshape(-1)


def _conv_patch(t, shapes):
    """Conv2d weight [width, 3, p, p] -> patch kernel [(row, col, channel), width]."""
    return [t.transpose(2, 3, 1, 0).reshape(shapes[0])]


def _conv_patch_back(arrays):
    kernel = arrays[0]
    width = kernel.shape[1]
    p = int(round((kernel.shape[0] // 3) ** 0.5))
    return kernel.reshape(p, p, 3, width).transpose(3, 2, 0, 1)


def _identity(torch_key: str, path: Path) -> Rule:
    return Rule(torch_key, (path,), _same, _same_back)


def _layer_norm(torch_prefix: str, path: Path) -> list[Rule]:
    return [_identity(f"{torch_prefix}.weight", path + ("scale",)),
            _identity(f"{torch_prefix}.bias", path + ("bias",))]


def _block_rules(torch_prefix: str, path: Path, layer: int) -> list[Rule]:
    attn = path + ("attn",)
    mlp = path + ("mlp",)
    rules = [
        *_layer_norm(f"{torch_prefix}.ln_1", path + ("ln_1",)),
        Rule(f"{torch_prefix}.attn.in_proj_weight",
             (attn + ("query",), attn + ("key",), attn + ("value",)), _fused_qkv, _fused_qkv_back),
        Rule(f"{torch_prefix}.attn.in_proj_bias",
             (attn + ("query_bias",), attn + ("key_bias",), attn + ("value_bias",)),
             _fused_qkv_bias, _fused_qkv_bias_back),
        Rule(f"{torch_prefix}.attn.out_proj.weight", (attn + ("out",),), _linear, _kernel_out_last),
        _identity(f"{torch_prefix}.attn.out_proj.bias", attn + ("out_bias",)),
        *_layer_norm(f"{torch_prefix}.ln_2", path + ("ln_2",)),
        Rule(f"{torch_prefix}.mlp.c_fc.weight", (mlp + ("fc",),), _linear, _kernel_in_first),
        _identity(f"{torch_prefix}.mlp.c_fc.bias", mlp + ("fc_bias",)),
        Rule(f"{torch_prefix}.mlp.c_proj.weight", (mlp + ("proj",),), _linear, _kernel_in_first),
        _identity(f"{torch_prefix}.mlp.c_proj.bias", mlp + ("proj_bias",)),
    ]
    return [dataclasses.replace(rule, layer=layer) for rule in rules]


def name_table(config: CLIPConfig) -> list[Rule]:
    """All rules for an open_clip `CLIP` (ViT image tower, built-in text tower)."""
    rules = [
        Rule("visual.conv1.weight", (("visual", "patch_embed"),), _conv_patch, _conv_patch_back),
        _identity("visual.class_embedding", ("visual", "class_embedding")),
        _identity("visual.positional_embedding", ("visual", "positional_embedding")),
        *_layer_norm("visual.ln_pre", ("visual", "ln_pre")),
        *_layer_norm("visual.ln_post", ("visual", "ln_post")),
        _identity("visual.proj", ("visual", "proj")),
        _identity("token_embedding.weight", ("text", "token_embedding")),
        _identity("positional_embedding", ("text", "positional_embedding")),
        *_layer_norm("ln_final", ("text", "ln_final")),
        _identity("text_projection", ("text", "text_projection")),
        _identity("logit_scale", ("logit_scale",)),
    ]
    if config.init_logit_bias is not None:
        rules.append(_identity("logit_bias", ("logit_bias",)))
    for i in range(config.vision.layers):
        rules += _block_rules(f"visual.transformer.resblocks.{i}", ("visual", "transformer", STACKED_BLOCKS), i)
    for i in range(config.text.layers):
        rules += _block_rules(f"transformer.resblocks.{i}", ("text", "transformer", STACKED_BLOCKS), i)
    return rules


# Keys found in some open_clip / OpenAI checkpoints that are not weights.
IGNORED_TORCH_KEYS = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask",
                                "visual.attn_mask"})


def to_torch_state_dict(config: CLIPConfig, params: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """bioclip_jax parameters (flat path -> array) -> open_clip state_dict (key -> array)."""
    def array(rule: Rule, path: Path) -> np.ndarray:
        value = np.asarray(params[path])
        return value if rule.layer is None else value[rule.layer]

    return {rule.torch_key: np.array(rule.to_torch([array(rule, p) for p in rule.jax_paths]), order="C")
            for rule in name_table(config)}


class WeightMismatchError(ValueError):
    """A state dict that does not fit the architecture (message names the key)."""


def from_torch_state_dict(config: CLIPConfig, state_dict: Mapping[str, np.ndarray],
                          target_shapes: Mapping[Path, tuple[int, ...]], source: str = "checkpoint"
                          ) -> dict[Path, np.ndarray]:
    """open_clip state_dict -> bioclip_jax parameters, checking keys and shapes strictly."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    rules = name_table(config)
    expected = {rule.torch_key for rule in rules}
    unexpected = sorted(k for k in state_dict if k not in expected and k not in IGNORED_TORCH_KEYS)
    missing = sorted(expected - set(state_dict))
    if missing:
        raise WeightMismatchError(f"{source} lacks {len(missing)} open_clip key(s) the model needs, "
                           f"e.g. {missing[:3]}; is it a {_describe(config)} model?")
    if unexpected:
        raise WeightMismatchError(f"{source} has {len(unexpected)} key(s) this architecture does not use, "
                           f"e.g. {unexpected[:3]}; is it a {_describe(config)} model?")
    params: dict[Path, np.ndarray] = {}
    layers: dict[Path, dict[int, np.ndarray]] = {}  # stacked paths: layer -> slice
    for rule in rules:
        tensor = np.asarray(state_dict[rule.torch_key])
        shapes = [tuple(target_shapes[p])[rule.layer is not None:] for p in rule.jax_paths]
        expected_torch = rule.to_torch([np.zeros(s, np.float32) for s in shapes]).shape
        if tensor.shape != expected_torch:
            raise WeightMismatchError(f"shape mismatch for {rule.torch_key!r} in {source}: checkpoint has "
                               f"{list(tensor.shape)}, the model expects {list(expected_torch)}")
        for path, array in zip(rule.jax_paths, rule.to_jax(tensor, shapes)):
            if rule.layer is None:
                params[path] = array
            else:
                layers.setdefault(path, {})[rule.layer] = array
    for path, slices in layers.items():
        params[path] = np.stack([slices[i] for i in range(len(slices))])
    return params


def _describe(config: CLIPConfig) -> str:
    v, t = config.vision, config.text
    return (f"ViT (width {v.width}, {v.layers} layers, patch {v.patch_size}, image {v.image_size}) + "
            f"text (width {t.width}, {t.layers} layers), embed_dim {config.embed_dim}")
