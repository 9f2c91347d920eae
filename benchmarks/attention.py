"""Our head-major attention einsums against `jax.nn.dot_product_attention` (XLA), side by side.

    python benchmarks/attention.py                    # ViT-B-16 towers, fp32, forward + backward
    python benchmarks/attention.py --quick            # < 1 minute: ViT-Tiny-8

It decides what `config.attention = "auto"` picks on a CPU: each tower of the same model
(same weights) runs forward and backward (the gradient of a sum of its features with
respect to every parameter, as in training), once per kernel, interleaved. Ratios are
xla time / head_major time: > 1 means the head-major path is faster here.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

import _timing

KERNELS = ("head_major", "xla")


def tower_step(model_name: str, kernel: str, tower: str, dtype: str):
    """Jitted `grads(inputs)` of one tower's summed features, for `kernel`."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from bioclip_jax.models.clip import build_model  # noqa: PLC0415
    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415

    model = build_model(get_model_config(model_name), seed=0, dtype=getattr(jnp, dtype), attention=kernel)
    graphdef, params = nnx.split(model)

    @jax.jit
    def grads(params, inputs):
        def loss(params):
            features = nnx.merge(graphdef, params)
            out = features.image_features(inputs) if tower == "image" else features.text_features(inputs)
            return jnp.sum(jnp.square(out))
        return jax.grad(loss)(params)

    return lambda inputs: jax.block_until_ready(grads(params, inputs))


def tower_inputs(model_name: str, tower: str, batch: int, seed: int = 0):
    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415

    arch = get_model_config(model_name)
    rng = np.random.default_rng(seed)
    if tower == "image":
        size = arch.vision.image_size
        return rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    tokens = rng.integers(1, 49000, (batch, arch.text.context_length)).astype(np.int32)
    tokens[:, -1] = 49407  # end of text at the last position: every row uses all 77 positions
    return tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="architecture (default ViT-B-16; ViT-Tiny-8 with --quick)")
    parser.add_argument("--batch", type=int, help="batch per tower call (default 8; 4 with --quick)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    _timing.add_common_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    args.model = args.model or ("ViT-Tiny-8" if args.quick else "ViT-B-16")
    args.batch = args.batch or (4 if args.quick else 8)
    if args.quick:
        args.repeats = min(args.repeats, 2)
    import jax  # noqa: PLC0415

    jax.config.update("jax_platforms", "cpu")
    threads = _timing.pin_threads(args.threads, torch_too=False)
    _timing.warn_if_busy(threads)
    machine = _timing.machine_info(threads)
    print(f"{args.model}, batch {args.batch}, {args.dtype}, forward + backward, {threads} thread(s), "
          f"{args.repeats} interleaved rounds")
    rows = []
    for tower in ("image", "text"):
        inputs = tower_inputs(args.model, tower, args.batch)
        steps = {kernel: tower_step(args.model, kernel, tower, args.dtype) for kernel in KERNELS}
        rows.append(_timing.side_by_side(f"{tower} tower {args.dtype} (B={args.batch})",
                                         lambda: steps["head_major"](inputs), lambda: steps["xla"](inputs),
                                         args.batch, args.repeats, args.warmup, unit="items/s", sides=KERNELS))
    _timing.print_rows(rows)
    _timing.write_json(args.out, {"benchmark": "attention", "args": vars(args), "machine": machine,
                                  "load_average_after": os.getloadavg(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
