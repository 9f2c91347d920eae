"""Few-shot classification: SimpleShot nearest centroid with CL2N, and an optional linear probe.

BioCLIP's protocol (after Wang et al., 2019, "SimpleShot"): features are L2-normalised,
the mean of the support set is subtracted and they are normalised again ("CL2N"); each
class centroid is the mean of its k transformed support features and a query goes to
the nearest centroid (Euclidean). Per trial t (seed t) every class's images are shuffled,
the first k are support and the rest are queries. Classes with fewer than k images are
left out of that k (reported); mean and std are over trials.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cl2n(features: np.ndarray, support_mean: np.ndarray) -> np.ndarray:
    """L2-normalise, centre on the support mean (of normalised features), normalise again."""
    return l2n(l2n(features) - support_mean)


@dataclasses.dataclass(frozen=True)
class Split:
    support: np.ndarray  # indices into the feature array, grouped by class
    support_labels: np.ndarray
    query: np.ndarray
    classes: np.ndarray  # the class ids taking part


def sample_split(labels: np.ndarray, k: int, seed: int) -> Split:
    """k support images per class (classes with fewer than k images are left out), the rest query."""
    rng = np.random.default_rng(seed)
    support, support_labels, query, classes = [], [], [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < k:
            continue
        support.append(members[:k])
        support_labels.append(np.full(k, cls))
        query.append(members[k:])
        classes.append(cls)
    if not classes:
        raise ValueError(f"no class has {k} images; cannot run {k}-shot")
    return Split(np.concatenate(support), np.concatenate(support_labels), np.concatenate(query),
                 np.asarray(classes))


def nearest_centroid_predict(support: np.ndarray, support_labels: np.ndarray, query: np.ndarray) -> np.ndarray:
    """SimpleShot CL2N: predicted class id for each query row."""
    mean = l2n(support).mean(axis=0)
    support_t, query_t = cl2n(support, mean), cl2n(query, mean)
    classes = np.unique(support_labels)
    centroids = np.stack([support_t[support_labels == c].mean(axis=0) for c in classes])
    # ||q - c||^2 = |q|^2 - 2 q.c + |c|^2; |q| = 1 after CL2N, so only the last two terms matter.
    distance = -2.0 * query_t @ centroids.T + (centroids ** 2).sum(axis=1)[None, :]
    return classes[np.argmin(distance, axis=1)]


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fit_linear(x, y, num_classes: int, steps: int):
    """Multinomial logistic regression, full batch, Adam with a small L2 penalty."""
    params = (jnp.zeros((x.shape[1], num_classes)), jnp.zeros((num_classes,)))
    optimizer = optax.adam(0.05)

    def loss(p):
        logits = x @ p[0] + p[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + 1e-4 * jnp.sum(p[0] ** 2)

    def step(carry, _):
        p, state = carry
        updates, state = optimizer.update(jax.grad(loss)(p), state)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def linear_probe_predict(support: np.ndarray, support_labels: np.ndarray, query: np.ndarray,
                         steps: int = 300) -> np.ndarray:
    """A logistic-regression probe on the normalised support features."""
    classes, y = np.unique(support_labels, return_inverse=True)
    weights, bias = _fit_linear(jnp.asarray(l2n(support)), jnp.asarray(y), len(classes), steps)
    return classes[np.asarray(jnp.argmax(jnp.asarray(l2n(query)) @ weights + bias, axis=1))]


CLASSIFIERS = {"centroid": nearest_centroid_predict, "linear": linear_probe_predict}


@dataclasses.dataclass
class Trial:
    seed: int
    accuracy: float
    query: np.ndarray
    predictions: np.ndarray


def few_shot_trials(features: np.ndarray, labels: np.ndarray, k: int, trials: int,
                    classifier: str = "centroid") -> list[Trial]:
    """One Trial per seed 0..trials-1; predictions are kept for per-rank scoring."""
    labels = np.asarray(labels)
    predict = CLASSIFIERS[classifier]
    short = [c for c, n in zip(*np.unique(labels, return_counts=True)) if n < k]
    if short:
        log.warning(f"{k}-shot: {len(short)} classes have fewer than {k} images and are left out")
    results = []
    for seed in range(trials):
        split = sample_split(labels, k, seed)
        if split.query.size == 0:
            raise ValueError(f"{k}-shot leaves no query images; each class needs more than {k} images")
        predictions = predict(features[split.support], split.support_labels, features[split.query])
        accuracy = float((predictions == labels[split.query]).mean())
        results.append(Trial(seed, accuracy, split.query, predictions))
    return results
