"""Model architectures by name, and conversion to/from open_clip's `model_cfg` dict.

One table (`ARCHITECTURES`) holds every named variant, big_vision style; any other
open_clip ViT config read from `open_clip_config.json` works through `from_open_clip`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

# OpenAI CLIP normalisation constants (open_clip's OPENAI_DATASET_MEAN/STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    quick_gelu: bool = False
    init_logit_bias: float | None = None  # set for SigLIP-style (sigmoid loss) models


def _clip(embed_dim, vision: dict, text: dict, quick_gelu=False) -> CLIPConfig:
    return CLIPConfig(embed_dim, VisionConfig(**vision), TextConfig(**text), quick_gelu)


_BASE_TEXT = dict(width=512, heads=8, layers=12)
_BASE_ARCHITECTURES = {
    "ViT-B-32": _clip(512, dict(patch_size=32, width=768, layers=12), _BASE_TEXT),
    "ViT-B-16": _clip(512, dict(patch_size=16, width=768, layers=12), _BASE_TEXT),
    "ViT-L-14": _clip(768, dict(patch_size=14, width=1024, layers=24), dict(width=768, heads=12, layers=12)),
    "ViT-H-14": _clip(1024, dict(patch_size=14, width=1280, layers=32, head_width=80),
                      dict(width=1024, heads=16, layers=24)),
    # Tiny towers for the synthetic tree of life and tests; not an open_clip name.
    "ViT-Tiny-8": _clip(128, dict(image_size=64, patch_size=8, width=128, layers=4, head_width=32),
                        dict(width=128, heads=4, layers=4)),
}

ARCHITECTURES: dict[str, CLIPConfig] = {}
for _name, _cfg in _BASE_ARCHITECTURES.items():
    ARCHITECTURES[_name] = _cfg
    ARCHITECTURES[_name + "-quickgelu"] = dataclasses.replace(_cfg, quick_gelu=True)


def get_model_config(name: str) -> CLIPConfig:
    """Returns the architecture registered under `name` (open_clip naming)."""
    try:
        return ARCHITECTURES[name.replace("/", "-")]
    except KeyError:
        raise ValueError(
            f"unknown model name {name!r}; known models: {', '.join(sorted(ARCHITECTURES))}"
        ) from None


_VISION_KEYS = {f.name for f in dataclasses.fields(VisionConfig)}
_TEXT_KEYS = {f.name for f in dataclasses.fields(TextConfig)}
_TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_bias"}
# open_clip options that change the architecture (or the tokens) unless at open_clip's default,
# the only value bioclip_jax implements.
_SHARED_DEFAULTS = {"ls_init_value": None, "final_ln_after_pool": False, "output_tokens": False,
                    "act_kwargs": None, "norm_kwargs": None, "block_type": None, "qk_norm": False,
                    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                    "scale_attn": False, "scale_fc": False}
_VISION_DEFAULTS = {**_SHARED_DEFAULTS, "patch_dropout": 0.0, "attentional_pool": False, "no_ln_pre": False,
                    "pos_embed_type": "learnable", "pool_type": "tok", "timm_model_name": None}
_TEXT_DEFAULTS = {**_SHARED_DEFAULTS, "embed_cls": False, "no_causal_mask": False, "pool_type": "argmax",
                  "proj_bias": False, "proj_type": "linear", "hf_model_name": None, "hf_tokenizer_name": None,
                  "tokenizer_mode": None, "tokenizer_kwargs": None, "pad_id": 0}
_TOP_DEFAULTS = {"custom_text": False, "multimodal_cfg": None, "nonscalar_logit_scale": False}
# Harmless at any value: they configure parts that the defaults above switch off (a timm or
# Hugging Face tower, the attentional pooler, end-of-text pooling).
_VISION_IGNORED = {"timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop",
                   "timm_drop_path", "attn_pooler_queries", "attn_pooler_heads"}
_TEXT_IGNORED = {"hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "eos_id"}


def _pick(section: str, cfg: Mapping[str, Any], keys: set[str], defaults: dict, ignored: set[str],
          source: str) -> dict:
    """The fields bioclip_jax builds from; any other key must be harmless, or the import is refused."""
    where = f" in {source}" if source else ""
    out = {}
    for key, value in cfg.items():
        name = f"{section}.{key}" if section else key
        if key in keys:
            out[key] = value
        elif key in defaults:
            if value != defaults[key]:
                raise ValueError(f"open_clip {name}={value!r}{where} is not supported by bioclip_jax "
                                 f"(only {defaults[key]!r})")
        elif key not in ignored:
            raise ValueError(f"open_clip {name}={value!r}{where} is unknown to bioclip_jax, which refuses "
                             f"what might build a different model")
    return out


def from_open_clip(model_cfg: Mapping[str, Any], source: str = "") -> CLIPConfig:
    """Builds a CLIPConfig from open_clip's `model_cfg` (as in open_clip_config.json; `source` names
    the file in errors). A key that would build a model other than the one open_clip builds is refused."""
    top = _pick("", model_cfg, _TOP_KEYS, _TOP_DEFAULTS, set(), source)
    vision = dict(top.get("vision_cfg", {}))
    text = dict(top.get("text_cfg", {}))
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError("ResNet image towers are not supported; bioclip_jax implements ViT towers")
    if isinstance(vision.get("image_size"), (list, tuple)):
        size = vision["image_size"]
        if size[0] != size[1]:
            raise ValueError(f"non-square image_size {size} is not supported")
        vision["image_size"] = size[0]
    return CLIPConfig(
        embed_dim=int(top["embed_dim"]),
        vision=VisionConfig(**_pick("vision_cfg", vision, _VISION_KEYS, _VISION_DEFAULTS, _VISION_IGNORED, source)),
        text=TextConfig(**_pick("text_cfg", text, _TEXT_KEYS, _TEXT_DEFAULTS, _TEXT_IGNORED, source)),
        quick_gelu=bool(top.get("quick_gelu", False)),
        init_logit_bias=top.get("init_logit_bias"),
    )


def to_open_clip(config: CLIPConfig) -> dict[str, Any]:
    """The `model_cfg` dict open_clip needs to rebuild this architecture."""
    out: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "vision_cfg": dataclasses.asdict(config.vision),
        "text_cfg": dataclasses.asdict(config.text),
    }
    if config.quick_gelu:
        out["quick_gelu"] = True
    if config.init_logit_bias is not None:
        out["init_logit_bias"] = config.init_logit_bias
    return out
