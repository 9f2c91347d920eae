"""Transformer building blocks shared by the image and text towers.

Parameters are created in float32 and carry logical axis names (`out_sharding`
metadata, not applied eagerly) that `bioclip_jax.parallel.sharding` maps onto a
mesh; computation runs in `dtype` (float32 or bfloat16), LayerNorm in float32.
Kernel layouts are chosen so that open_clip weights map onto them by transposes
and reshapes only (see `bioclip_jax.convert.names`), which keeps import exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bioclip_jax.models import attention, remat as remat_lib
from bioclip_jax.parallel.sharding import constrain

LN_EPSILON = 1e-5  # PyTorch's LayerNorm default, which open_clip uses.
TOKENS = ("batch", None, None)  # logical sharding of [batch, tokens, width] activations


@dataclasses.dataclass(frozen=True)
class Init:
    """How a parameter starts: N(0, std^2), or a constant. Kept as metadata on the parameter
    so that `bioclip_jax.models.clip.build_model` can fill an abstract model with numpy,
    which is much faster than compiling one random kernel per parameter shape."""

    std: float = 0.0
    constant: float = 0.0

    def __call__(self, key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        if self.std:
            return self.std * jax.random.normal(key, shape, dtype)
        return jnp.full(shape, self.constant, dtype)

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.std:
            return (self.std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        return np.full(shape, self.constant, np.float32)


def normal(std: float) -> Init:
    return Init(std=float(std))


ZEROS = Init(constant=0.0)
ONES = Init(constant=1.0)


def logical_param(rngs: nnx.Rngs, init: Init, shape: Sequence[int], axes: tuple) -> nnx.Param:
    """A float32 parameter annotated with logical axis names and its initialiser."""
    value = init(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, init=init)


def _gelu_with_input_saved(forward: Callable, derivative: Callable) -> Callable:
    """An activation whose backward pass keeps only its input (in the compute dtype) and
    evaluates `derivative` in float32; autodiff of the forward formula would keep several
    intermediates of the width-4x hidden layer."""

    @jax.custom_vjp
    def activation(x):
        return forward(x)

    def backward(x, cotangent):
        x32 = x.astype(jnp.float32)
        return ((derivative(x32) * cotangent.astype(jnp.float32)).astype(x.dtype),)

    activation.defvjp(lambda x: (forward(x), x), backward)
    return activation


QUICK_GELU_SCALE = 1.702


def _quick_gelu_derivative(x):
    s = jax.nn.sigmoid(QUICK_GELU_SCALE * x)
    return s * (1 + QUICK_GELU_SCALE * x * (1 - s))


def _exact_gelu_derivative(x):
    return 0.5 * (1 + jax.lax.erf(x * np.float32(2 ** -0.5))) + x * jnp.exp(-0.5 * x * x) * np.float32(
        (2 * np.pi) ** -0.5)


#: The activation OpenAI CLIP (and BioCLIP v1) were trained with.
quick_gelu = _gelu_with_input_saved(lambda x: x * jax.nn.sigmoid(QUICK_GELU_SCALE * x), _quick_gelu_derivative)
#: PyTorch's nn.GELU default: the erf form, not the tanh approximation.
exact_gelu = _gelu_with_input_saved(lambda x: jax.nn.gelu(x, approximate=False), _exact_gelu_derivative)


def _normalized(x: jax.Array, mean: jax.Array, inverse_std: jax.Array) -> jax.Array:
    return (x.astype(jnp.float32) - mean) * inverse_std


@jax.custom_vjp
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
    """LayerNorm over the last axis in float32, returned in x's dtype.

    The backward pass keeps x in its own dtype plus the float32 mean and inverse standard
    deviation per row, and recomputes the normalised rows from them: autodiff of the same
    formula would keep three float32 copies of every [tokens, width] input.
    """
    return _layer_norm_forward(x, scale, bias)[0]


def _layer_norm_forward(x, scale, bias):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    inverse_std = jax.lax.rsqrt(jnp.square(x32 - mean).mean(-1, keepdims=True) + LN_EPSILON)
    y = (x32 - mean) * inverse_std
    return (y * scale + bias).astype(x.dtype), (x, mean, inverse_std, scale)


def _layer_norm_backward(saved, cotangent):
    x, mean, inverse_std, scale = saved
    y = _normalized(x, mean, inverse_std)
    g = cotangent.astype(jnp.float32)
    rows = tuple(range(g.ndim - 1))
    g_y = g * scale
    dx = inverse_std * (g_y - g_y.mean(-1, keepdims=True) - y * (g_y * y).mean(-1, keepdims=True))
    return dx.astype(x.dtype), jnp.sum(g * y, axis=rows), jnp.sum(g, axis=rows)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.scale = logical_param(rngs, ONES, (width,), ("embed",))
        self.bias = logical_param(rngs, ZEROS, (width,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.scale[...], self.bias[...])


# Names of the block's weight-matmul outputs (`jax.ad_checkpoint.checkpoint_name`): what the
# "minimal" remat policy keeps, so that only LayerNorm, attention and GELU are recomputed.
QKV, CONTEXT, ATTENTION_OUT, MLP_HIDDEN, MLP_OUT = "qkv", "attention_context", "attention_out", "mlp_hidden", "mlp_out"
MATMUL_OUTPUTS = (QKV, CONTEXT, ATTENTION_OUT, MLP_HIDDEN, MLP_OUT)


class Attention(nnx.Module):
    """Multi-head self-attention with q/k/v kernels [embed, heads, head_dim].

    The three kernels are stored apart (open_clip's in_proj maps onto them by reshapes) and
    joined into one [embed, 3, heads, head_dim] kernel for the computation: one matmul
    instead of three. `implementation` names the kernel (`bioclip_jax.models.attention`);
    the towers resolve it once per call and pass it down as `kernel`.
    """

    def __init__(self, width: int, heads: int, *, proj_std: float, implementation: str = attention.AUTO,
                 rngs: nnx.Rngs):
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.implementation = attention.check(implementation)
        head_dim = width // heads
        in_init = normal(width ** -0.5)
        qkv_axes = ("embed", "heads", "head_dim")
        self.query = logical_param(rngs, in_init, (width, heads, head_dim), qkv_axes)
        self.key = logical_param(rngs, in_init, (width, heads, head_dim), qkv_axes)
        self.value = logical_param(rngs, in_init, (width, heads, head_dim), qkv_axes)
        self.query_bias = logical_param(rngs, ZEROS, (heads, head_dim), ("heads", "head_dim"))
        self.key_bias = logical_param(rngs, ZEROS, (heads, head_dim), ("heads", "head_dim"))
        self.value_bias = logical_param(rngs, ZEROS, (heads, head_dim), ("heads", "head_dim"))
        self.out = logical_param(rngs, normal(proj_std), (heads, head_dim, width),
                                 ("heads", "head_dim", "embed"))
        self.out_bias = logical_param(rngs, ZEROS, (width,), ("embed",))

    @property
    def head_dim(self) -> int:
        return self.query.shape[-1]

    def __call__(self, x: jax.Array, mask: jax.Array | np.ndarray | None, kernel: str | None = None,
                 valid_tokens: int | None = None) -> jax.Array:
        """`valid_tokens`: keys from this position on are padding that no query may see."""
        dtype = x.dtype
        kernel = kernel or attention.resolve(self.implementation, dtype, head_dim=self.head_dim)
        weight = jnp.stack([self.query[...], self.key[...], self.value[...]], axis=1).astype(dtype)
        bias = jnp.stack([self.query_bias[...], self.key_bias[...], self.value_bias[...]]).astype(dtype)
        if kernel == attention.HEAD_MAJOR:  # [batch, 3, heads, tokens, head_dim] for our CPU einsums
            qkv = checkpoint_name(jnp.einsum("btd,dchk->bchtk", x, weight) + bias[:, :, None], QKV)
            return self.attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], mask, valid_tokens)
        # [batch, tokens, 3, heads, head_dim]: the matmul's own output order, which the
        # accelerator kernels take as it is.
        qkv = checkpoint_name(jnp.einsum("btd,dchk->btchk", x, weight) + bias, QKV)
        context = attention.fused(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask, kernel, valid_tokens)
        return self.output(context, "bqhk")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask, valid_tokens: int | None = None) -> jax.Array:
        """Head-major attention on [batch, heads, tokens, head_dim] q/k/v, then the output projection."""
        return self.output(attention.head_major(q, k, v, mask, valid_tokens), "bhqk")

    def output(self, context: jax.Array, layout: str) -> jax.Array:
        dtype = context.dtype
        context = checkpoint_name(context, CONTEXT)
        return checkpoint_name(jnp.einsum(f"{layout},hkd->bqd", context, self.out[...].astype(dtype))
                               + self.out_bias[...].astype(dtype), ATTENTION_OUT)


class MLP(nnx.Module):
    def __init__(self, width: int, hidden: int, activation: Callable, *, proj_std: float,
                 rngs: nnx.Rngs):
        self.activation = activation
        self.fc = logical_param(rngs, normal((2 * width) ** -0.5), (width, hidden),
                                ("embed", "mlp"))
        self.fc_bias = logical_param(rngs, ZEROS, (hidden,), ("mlp",))
        self.proj = logical_param(rngs, normal(proj_std), (hidden, width), ("mlp", "embed"))
        self.proj_bias = logical_param(rngs, ZEROS, (width,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        h = checkpoint_name(x @ self.fc[...].astype(dtype) + self.fc_bias[...].astype(dtype), MLP_HIDDEN)
        h = self.activation(h)
        return checkpoint_name(h @ self.proj[...].astype(dtype) + self.proj_bias[...].astype(dtype), MLP_OUT)


class ResidualBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: Callable, *,
                 layers: int, attention_kernel: str = attention.AUTO, rngs: nnx.Rngs):
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        self.ln_1 = LayerNorm(width, rngs=rngs)
        self.attn = Attention(width, heads, proj_std=proj_std, implementation=attention_kernel, rngs=rngs)
        self.ln_2 = LayerNorm(width, rngs=rngs)
        self.mlp = MLP(width, mlp_width, activation, proj_std=proj_std, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, kernel: str | None = None,
                 valid_tokens: int | None = None) -> jax.Array:
        x = constrain(x, TOKENS)
        x = constrain(x + self.attn(self.ln_1(x), mask, kernel, valid_tokens), TOKENS)
        return x + self.mlp(self.ln_2(x))


STACKED_BLOCKS = "blocks"  # parameter path part of the stacked blocks: `Transformer.blocks`
LAYERS_AXIS = "layers"     # logical name of the stacking axis


class Transformer(nnx.Module):
    """A stack of residual blocks whose parameters are stored stacked: one [layers, ...]
    array per name (big_vision's layout; `bioclip_jax.convert.names` splits them into
    open_clip's per-block tensors at import/export).

    `scan` runs the blocks in `lax.scan` over the stacked parameters. The loop is a hard
    fusion boundary: unrolled, XLA:CPU fuses the backward chain of residual-gradient adds
    and LayerNorm backward passes of all later blocks into each consumer, work that grows
    with layers^2; scanned, a train step compiles one block instead of all. `remat`
    (`bioclip_jax.models.remat`) says what each block recomputes in the backward pass.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: Callable, *,
                 remat: bool | str = remat_lib.NONE, scan: bool = False, attention_kernel: str = attention.AUTO,
                 rngs: nnx.Rngs):
        self.remat = remat_lib.check(remat)
        self.scan = scan
        self.layers = layers
        self.heads = heads
        self.head_dim = width // heads
        self.attention_kernel = attention.check(attention_kernel)

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
        def stacked_blocks(block_rngs: nnx.Rngs) -> ResidualBlock:
            return ResidualBlock(width, heads, mlp_width, activation, layers=layers,
                                 attention_kernel=attention_kernel, rngs=block_rngs)

        self.blocks = stacked_blocks(rngs)

    def __call__(self, x: jax.Array, *, causal: bool = False) -> jax.Array:
        """Blocks over [batch, tokens, width]; `causal`: each position sees only those before it.

        The attention kernel is resolved once here. Where it needs an even token count (cuDNN)
        the tokens get one zero row at the end for the blocks and lose it afterwards; keys
        there are masked (or, when causal, seen by no real position).
        """
        tokens = x.shape[1]
        kernel = attention.resolve(self.attention_kernel, x.dtype, head_dim=self.head_dim, tokens=tokens,
                                   heads=self.heads, causal=causal)
        padded = attention.padded_length(tokens, kernel)
        valid_tokens = tokens if padded != tokens and not causal else None
        x = jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0))) if padded != tokens else x
        mask = attention.causal_mask(padded) if causal else None
        run = self.scanned if self.scan else self.unrolled
        return run(x, mask, kernel, valid_tokens)[:, :tokens]

    def unrolled(self, x: jax.Array, mask, kernel: str, valid_tokens: int | None) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def run_block(block_state, y):
            return nnx.merge(graphdef, block_state)(y, mask, kernel, valid_tokens)

        run = remat_lib.checkpointed(run_block, self.remat, in_scan=False)
        for i in range(self.layers):
            x = run(jax.tree.map(lambda value: value[i], stacked), x)
        return x

    def scanned(self, x: jax.Array, mask, kernel: str, valid_tokens: int | None) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, block_state):
            return nnx.merge(graphdef, block_state)(carry, mask, kernel, valid_tokens), None

        return jax.lax.scan(remat_lib.checkpointed(body, self.remat, in_scan=True), x, stacked)[0]
