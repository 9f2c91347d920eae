"""Scaled dot-product attention kernels, chosen by name (`config.attention`).

  head_major  our einsums on [batch, heads, tokens, head_dim]: both contractions batch over
              leading axes, which XLA:CPU runs faster than token-major ones
  xla         the same einsums on [batch, tokens, heads, head_dim], the layout the projections
              produce on accelerators (no transposes around the kernel)
  cudnn       cuDNN flash attention through `jax.nn.dot_product_attention` (GPU, bfloat16 or
              float16): the [T, S] scores never reach memory, and the text tower's causal mask
              skips work
  auto        cudnn on a GPU in bfloat16/float16 where cuDNN runs the towers' shapes, xla there
              otherwise and on TPUs, head_major on CPUs

All compute the same attention. The logits are accumulated in float32 whatever the compute
dtype (`preferred_element_type`, not a cast of a bfloat16 product), and the einsum kernels
keep only the compute-dtype softmax weights for the backward pass (`softmax_weights`).

cuDNN's training kernel wants an even number of tokens (`jax.nn.dot_product_attention`
passes its fused path a placeholder bias, and biased training needs even T and S). The towers
therefore run cuDNN at `padded_length` tokens: the image tower masks the extra key with
`valid_tokens`; the text tower is causal, so no real position ever sees the extra one.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

AUTO, XLA, CUDNN, HEAD_MAJOR = "auto", "xla", "cudnn", "head_major"
CHOICES = (AUTO, XLA, CUDNN, HEAD_MAJOR)
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128  # the largest head every supported GPU generation's kernel takes (Hopper: 256)

log = logging.getLogger(__name__)


def check(value: str, field: str = "attention") -> str:
    if value not in CHOICES:
        raise ValueError(f"{field}={value!r} is not an attention kernel; choose one of {', '.join(CHOICES)}")
    return value


def _is_half(dtype) -> bool:
    return jnp.dtype(dtype) in [jnp.dtype(d) for d in _CUDNN_DTYPES]


def cudnn_takes_head_dim(head_dim: int | None) -> bool:
    return head_dim is None or (head_dim % 8 == 0 and head_dim <= CUDNN_MAX_HEAD_DIM)


def resolve(choice: str, dtype, backend: str | None = None, *, head_dim: int | None = None,
            tokens: int | None = None, heads: int | None = None, causal: bool = False) -> str:
    """The kernel that `choice` means for compute `dtype` on `backend` (default: JAX's default backend).

    With `tokens` and `heads` given, auto on a GPU first runs cuDNN once at that shape (cached)
    and takes xla if cuDNN fails there, so a run never crashes at its first step over a kernel.
    An explicit cudnn is taken on any backend, so that a CPU machine can lower a program for
    CUDA; `require_runnable` refuses to compile it where it cannot run.
    """
    backend = backend or jax.default_backend()
    half = _is_half(dtype)
    if choice == AUTO:
        if backend == "cpu":
            return HEAD_MAJOR
        if backend != "gpu" or not half or not cudnn_takes_head_dim(head_dim):
            return XLA
        if tokens is not None and heads is not None and not cudnn_runs(
                padded_length(tokens, CUDNN), heads, head_dim, jnp.dtype(dtype).name, causal):
            return XLA
        return CUDNN
    if choice == CUDNN and not half:
        raise ValueError(f"attention={CUDNN!r} needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name}")
    if choice == CUDNN and not cudnn_takes_head_dim(head_dim):
        raise ValueError(f"attention={CUDNN!r} needs a head dimension that is a multiple of 8 and at most "
                         f"{CUDNN_MAX_HEAD_DIM}, not {head_dim}")
    return check(choice)


def require_runnable(choice: str, backend: str | None = None, field: str = "attention") -> None:
    """Refuse, in one sentence, to compile cuDNN attention where JAX has no GPU."""
    backend = backend or jax.default_backend()
    if choice == CUDNN and backend != "gpu":
        raise ValueError(f"{field}={CUDNN!r} runs on NVIDIA GPUs only and JAX's backend here is {backend}; "
                         f"use {AUTO!r}, which picks the fastest kernel that runs here")


@functools.lru_cache(maxsize=None)
def cudnn_runs(tokens: int, heads: int, head_dim: int, dtype: str, causal: bool) -> bool:
    """Whether cuDNN compiles and runs attention's forward and backward pass at this shape."""
    shape = (1, tokens, heads, head_dim)

    def loss(q, k, v):
        return cudnn(q, k, v, None, valid_tokens=None if causal else tokens - 1, causal=causal).astype(
            jnp.float32).sum()

    try:
        with jax.ensure_compile_time_eval():
            zeros = jnp.zeros(shape, dtype)
            jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(zeros, zeros, zeros))
    except Exception as error:  # noqa: BLE001 - any failure means: use the XLA kernel
        log.warning("cuDNN attention does not run at %d tokens x %d heads x %d (%s), so attention=auto uses xla: %s",
                    tokens, heads, head_dim, dtype, str(error).splitlines()[0] if str(error) else type(error).__name__)
        return False
    return True


def padded_length(tokens: int, kernel: str) -> int:
    """How many tokens a tower runs `kernel` at: cuDNN's training kernel needs an even count."""
    return tokens + tokens % 2 if kernel == CUDNN else tokens


def causal_mask(length: int) -> np.ndarray:
    """[length, length] lower-triangular mask, as numpy: a constant while tracing, so the kernels
    can recognise it and take `is_causal` instead of a mask array."""
    return np.tril(np.ones((length, length), dtype=bool))


def _is_causal(mask) -> bool:
    return (isinstance(mask, np.ndarray) and mask.ndim == 2 and mask.shape[0] == mask.shape[1]
            and np.array_equal(mask, causal_mask(mask.shape[0])))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_weights(logits: jax.Array, dtype) -> jax.Array:
    """softmax(logits) over the last axis, computed in float32 and returned in `dtype`.

    Its gradient needs only the returned weights, which the weighted sum over values keeps
    anyway: nothing else of the softmax (no float32 exponentials) is saved for the backward pass.
    """
    return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _softmax_forward(logits, dtype):
    weights = softmax_weights(logits, dtype)
    return weights, weights


def _softmax_backward(dtype, weights, cotangent):
    w = weights.astype(jnp.float32)
    g = cotangent.astype(jnp.float32)
    return (w * (g - jnp.sum(g * w, axis=-1, keepdims=True)),)


softmax_weights.defvjp(_softmax_forward, _softmax_backward)


def _masked(logits: jax.Array, mask, valid_tokens: int | None) -> jax.Array:
    """Logits [..., T, S] with masked-out keys at the float32 minimum (weight zero after softmax)."""
    keep = None if mask is None else jnp.asarray(mask, bool)
    if valid_tokens is not None:
        valid = jnp.arange(logits.shape[-1]) < valid_tokens
        keep = valid if keep is None else keep & valid
    return logits if keep is None else jnp.where(keep, logits, jnp.finfo(jnp.float32).min)


def _einsum_attention(q, k, v, mask, valid_tokens: int | None, scores: str, context: str) -> jax.Array:
    dtype = q.dtype
    q = q * jnp.asarray(q.shape[-1] ** -0.5, dtype)
    logits = jnp.einsum(scores, q, k, preferred_element_type=jnp.float32)
    weights = softmax_weights(_masked(logits, mask, valid_tokens), dtype)
    return jnp.einsum(context, weights, v)


def head_major(q: jax.Array, k: jax.Array, v: jax.Array, mask, valid_tokens: int | None = None) -> jax.Array:
    """Attention on [batch, heads, tokens, head_dim] q/k/v -> context in the same layout."""
    return _einsum_attention(q, k, v, mask, valid_tokens, "bhqk,bhsk->bhqs", "bhqs,bhsk->bhqk")


def token_major(q: jax.Array, k: jax.Array, v: jax.Array, mask, valid_tokens: int | None = None) -> jax.Array:
    """Attention on [batch, tokens, heads, head_dim] q/k/v -> context in the same layout."""
    return _einsum_attention(q, k, v, mask, valid_tokens, "bqhk,bshk->bhqs", "bhqs,bshk->bqhk")


def cudnn(q: jax.Array, k: jax.Array, v: jax.Array, mask, valid_tokens: int | None = None, *,
          causal: bool = False) -> jax.Array:
    """cuDNN flash attention on [batch, tokens, heads, head_dim] q/k/v (an even token count in training)."""
    masking = {}
    if causal or _is_causal(mask):
        masking["is_causal"] = True
    elif mask is not None:
        masking["mask"] = jnp.asarray(mask, bool).reshape((1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
    if valid_tokens is not None:
        masking["key_value_seq_lengths"] = jnp.full((q.shape[0],), valid_tokens, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, implementation=CUDNN, **masking)


def fused(q: jax.Array, k: jax.Array, v: jax.Array, mask, implementation: str,
          valid_tokens: int | None = None) -> jax.Array:
    """Attention on [batch, tokens, heads, head_dim] q/k/v by the token-major kernel `implementation`."""
    if implementation == CUDNN:
        return cudnn(q, k, v, mask, valid_tokens)
    return token_major(q, k, v, mask, valid_tokens)
