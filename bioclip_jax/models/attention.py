"""Scaled dot-product attention kernels, chosen by name (`config.attention`).

  head_major  our einsums on [batch, heads, tokens, head_dim]: both contractions batch over
              leading axes, which XLA:CPU ran twice as fast as token-major ones in the forward
              pass; a train step's towers run on par with the xla kernel or up to 1.1x faster
              (benchmarks/README.md, benchmarks/attention.py)
  xla         `jax.nn.dot_product_attention`'s XLA implementation, [batch, tokens, heads, head_dim]
  cudnn       the same call's cuDNN flash attention (GPU, bfloat16 or float16): the [T, S]
              scores never reach memory, and the text tower's causal mask skips work
  auto        cudnn on a GPU in bfloat16/float16, xla there in float32 and on TPUs,
              head_major on CPUs

All four compute the same attention; the logits are accumulated in float32 whatever the
compute dtype (`preferred_element_type`, not a cast of a bfloat16 product).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

AUTO, XLA, CUDNN, HEAD_MAJOR = "auto", "xla", "cudnn", "head_major"
CHOICES = (AUTO, XLA, CUDNN, HEAD_MAJOR)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def check(value: str, field: str = "attention") -> str:
    if value not in CHOICES:
        raise ValueError(f"{field}={value!r} is not an attention kernel; choose one of {', '.join(CHOICES)}")
    return value


def resolve(choice: str, dtype, backend: str | None = None) -> str:
    """The kernel that `choice` means for compute `dtype` on `backend` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]
    if choice == AUTO:
        if backend == "cpu":
            return HEAD_MAJOR
        return CUDNN if backend == "gpu" and half else XLA
    if choice == CUDNN and backend != "gpu":
        raise ValueError(f"attention={CUDNN!r} needs a GPU; JAX's default backend here is {backend}")
    if choice == CUDNN and not half:
        raise ValueError(f"attention={CUDNN!r} needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}")
    return check(choice)


def causal_mask(length: int) -> np.ndarray:
    """[length, length] lower-triangular mask, as numpy: a constant while tracing, so the fused
    kernels can recognise it and take `is_causal` instead of a mask array."""
    return np.tril(np.ones((length, length), dtype=bool))


def _is_causal(mask) -> bool:
    return (isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.shape[0] == mask.shape[1]
            and np.array_equal(mask, causal_mask(mask.shape[0])))


def head_major(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """Attention on [batch, heads, tokens, head_dim] q/k/v -> context in the same layout."""
    dtype = q.dtype
    q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
    logits = jnp.einsum("bhqk,bhsk->bhqs", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return jnp.einsum("bhqs,bhsk->bhqk", weights, v)


def fused(q: jax.Array, k: jax.Array, v: jax.Array, mask, implementation: str) -> jax.Array:
    """Attention on [batch, tokens, heads, head_dim] q/k/v through `jax.nn.dot_product_attention`."""
    if mask is None:
        masking = {}
    elif _is_causal(mask):
        masking = {"is_causal": True}
    else:
        masking = {"mask": jnp.asarray(mask, bool).reshape((1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))}
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **masking)
