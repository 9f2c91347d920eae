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


def quick_gelu(x: jax.Array) -> jax.Array:
    """The activation OpenAI CLIP (and BioCLIP v1) were trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
    """PyTorch's nn.GELU default: the erf form, not the tanh approximation."""
    return jax.nn.gelu(x, approximate=False)


class LayerNorm(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.scale = logical_param(rngs, ONES, (width,), ("embed",))
        self.bias = logical_param(rngs, ZEROS, (width,), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPSILON)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v kernels [embed, heads, head_dim].

    `implementation` names the kernel (`bioclip_jax.models.attention`); "auto" is resolved
    when the call is traced, from the compute dtype and JAX's default backend.
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

    def __call__(self, x: jax.Array, mask: jax.Array | np.ndarray | None) -> jax.Array:
        dtype = x.dtype
        kernel = attention.resolve(self.implementation, dtype)
        head_major = kernel == attention.HEAD_MAJOR

        # Head-major [batch, heads, tokens, head_dim] for our einsums, token-major for
        # jax.nn.dot_product_attention, which takes that layout; the parameters are the same.
        def project(weight, bias):
            if head_major:
                return jnp.einsum("btd,dhk->bhtk", x, weight[...].astype(dtype)) + bias[...].astype(dtype)[:, None]
            return jnp.einsum("btd,dhk->bthk", x, weight[...].astype(dtype)) + bias[...].astype(dtype)

        q, k, v = (project(self.query, self.query_bias), project(self.key, self.key_bias),
                   project(self.value, self.value_bias))
        if head_major:
            return self.attend(q, k, v, mask)
        return self.output(attention.fused(q, k, v, mask, kernel), "bqhk")

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
        """Head-major attention on [batch, heads, tokens, head_dim] q/k/v, then the output projection."""
        return self.output(attention.head_major(q, k, v, mask), "bhqk")

    def output(self, context: jax.Array, layout: str) -> jax.Array:
        dtype = context.dtype
        return (jnp.einsum(f"{layout},hkd->bqd", context, self.out[...].astype(dtype))
                + self.out_bias[...].astype(dtype))


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
        h = x @ self.fc[...].astype(dtype) + self.fc_bias[...].astype(dtype)
        h = self.activation(h)
        return h @ self.proj[...].astype(dtype) + self.proj_bias[...].astype(dtype)


class ResidualBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_width: int, activation: Callable, *,
                 layers: int, attention_kernel: str = attention.AUTO, rngs: nnx.Rngs):
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        self.ln_1 = LayerNorm(width, rngs=rngs)
        self.attn = Attention(width, heads, proj_std=proj_std, implementation=attention_kernel, rngs=rngs)
        self.ln_2 = LayerNorm(width, rngs=rngs)
        self.mlp = MLP(width, mlp_width, activation, proj_std=proj_std, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        x = constrain(x, TOKENS)
        x = constrain(x + self.attn(self.ln_1(x), mask), TOKENS)
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
    with layers^2; scanned, a ViT-B/16 train step runs ~1.4x faster on CPU and compiles
    one block instead of all. `remat` (`bioclip_jax.models.remat`: none, full or a policy name;
    True/False mean full/none) says what each block recomputes in the backward pass.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, activation: Callable, *,
                 remat: bool | str = remat_lib.NONE, scan: bool = False, attention_kernel: str = attention.AUTO,
                 rngs: nnx.Rngs):
        self.remat = remat_lib.check(remat)
        self.scan = scan
        self.layers = layers

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
        def stacked_blocks(block_rngs: nnx.Rngs) -> ResidualBlock:
            return ResidualBlock(width, heads, mlp_width, activation, layers=layers,
                                 attention_kernel=attention_kernel, rngs=block_rngs)

        self.blocks = stacked_blocks(rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return self.scanned(x, mask) if self.scan else self.unrolled(x, mask)

    def unrolled(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def run_block(block_state, y):
            return nnx.merge(graphdef, block_state)(y, mask)

        run = remat_lib.checkpointed(run_block, self.remat, in_scan=False)
        for i in range(self.layers):
            x = run(jax.tree.map(lambda value: value[i], stacked), x)
        return x

    def scanned(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, block_state):
            return nnx.merge(graphdef, block_state)(carry, mask), None

        return jax.lax.scan(remat_lib.checkpointed(body, self.remat, in_scan=True), x, stacked)[0]
