"""Scores of images against labels: softmax(exp(logit_scale) * cosine) over classes, summed into
groups (bins, or a taxonomic rank), top k per image, on the device."""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bioclip_jax.classify.labels import Labels
from bioclip_jax.models.clip import CLIP


@functools.partial(jax.jit, static_argnums=(4, 5))
def _top_k(image_features, class_features, scale, group_ids, num_groups: int, k: int, min_prob):
    probs = jax.nn.softmax(scale * image_features @ class_features.T, axis=-1)
    probs = jnp.where(probs > min_prob, probs, 0.0)
    grouped = jax.ops.segment_sum(probs.T, group_ids, num_segments=num_groups).T
    return jax.lax.top_k(grouped, k)


def logit_scale(model: CLIP) -> jax.Array:
    return jnp.exp(jnp.asarray(model.logit_scale[...], jnp.float32))


class Predictor:
    """Top-k rows per image for one set of labels; batches are padded to `batch_size` (one compiled shape)."""

    def __init__(self, model: CLIP, labels: Labels, k: int, batch_size: int):
        self.labels = labels
        self.k = max(1, min(k, len(labels.groups)))
        self.batch_size = batch_size
        self._classes = jnp.asarray(labels.features, jnp.float32)
        self._groups = jnp.asarray(labels.group_ids, jnp.int32)
        self._scale = logit_scale(model)

    @property
    def rows_per_image(self) -> int:
        return self.k

    def rows(self, keys: Sequence[str], image_features: np.ndarray) -> list[dict]:
        padded = np.zeros((self.batch_size, image_features.shape[1]), np.float32)
        padded[: len(keys)] = image_features
        scores, indices = _top_k(jnp.asarray(padded), self._classes, self._scale, self._groups,
                                 len(self.labels.groups), self.k, self.labels.min_prob)
        scores, indices = np.asarray(scores), np.asarray(indices)
        out = []
        for i, key in enumerate(keys):
            for score, index in zip(scores[i], indices[i]):
                out.append({"file_name": key, **self.labels.groups[index], "score": float(score)})
        return out
