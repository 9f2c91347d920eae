"""Zero-shot classification: class names -> prompt-ensemble text embeddings -> nearest by cosine.

BioCLIP's protocol: each class is named in one text type (taxon_com for BioCLIP,
common names for CLIP), put through the OpenAI ImageNet templates, and its embedding
is the normalised mean of the normalised prompt embeddings. Images are scored by
cosine similarity; the temperature does not change the ranking.
"""

from __future__ import annotations

import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bioclip_jax.data.eval_sources import EvalClass
from bioclip_jax.taxonomy.templates import OPENAI_IMAGENET_TEMPLATES
from bioclip_jax.inference import TextEmbedder
from bioclip_jax.models.clip import CLIP
from bioclip_jax.taxonomy import check_text_type, class_name

log = logging.getLogger(__name__)

_SCORE_CHUNK = 1024  # images per similarity block: [chunk, C] scores live on the device at once


def class_texts(classes: Sequence[EvalClass], text_type: str) -> list[str]:
    """Each class named in `text_type`; classes without a taxonomy keep their own name."""
    check_text_type(text_type)
    untyped = [c.name for c in classes if c.taxon is None]
    if untyped and text_type not in ("com",):
        log.warning(f"zero-shot: {len(untyped)} classes have no taxonomy, so they are named as given "
                    f"(e.g. {untyped[0]!r}) instead of as {text_type!r}")
    return [class_name(c.taxon, text_type) if c.taxon is not None else c.name.replace("_", " ")
            for c in classes]


def zero_shot_classifier(model: CLIP, names: Sequence[str], templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
                         *, batch_size: int = 256, progress: bool = False) -> np.ndarray:
    """[C, D] class embeddings (normalised template means), computed in chunks."""
    return TextEmbedder(model, batch_size=batch_size, progress=progress).classes(list(names), templates)


@functools.partial(jax.jit, static_argnums=2)
def _top_k(queries, keys, k: int):
    return jax.lax.top_k(queries @ keys.T, k)[1]


def top_k_classes(image_features: np.ndarray, class_features: np.ndarray, k: int = 5,
                  chunk: int = _SCORE_CHUNK) -> np.ndarray:
    """[N, k] class indices by decreasing similarity; blocks of `chunk` images keep memory bounded."""
    k = min(k, class_features.shape[0])
    keys = jnp.asarray(class_features, jnp.float32)
    out = np.zeros((image_features.shape[0], k), np.int32)
    for start in range(0, image_features.shape[0], chunk):
        block = image_features[start:start + chunk]
        padded = np.zeros((chunk if image_features.shape[0] > chunk else block.shape[0], block.shape[1]), np.float32)
        padded[: len(block)] = block
        out[start:start + len(block)] = np.asarray(_top_k(jnp.asarray(padded), keys, k))[: len(block)]
    return out


def top_k_accuracy(top_classes: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of images whose label is among the first k predictions, for each k."""
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("no labelled images to score")
    hits = top_classes == labels[:, None]
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}
