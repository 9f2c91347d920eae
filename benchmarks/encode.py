"""encode_image / encode_text throughput of bioclip_jax vs open_clip: same CPU, weights, batch and threads.

    python benchmarks/encode.py                       # ViT-B-16, 32 images / 256 texts, fp32, 5 rounds
    python benchmarks/encode.py --quick               # < 1 minute: small batches, 2 rounds
    python benchmarks/encode.py --bf16 --out r.json   # also time bfloat16 (JAX dtype / torch autocast)

Our randomly initialised model is exported to an open_clip folder and loaded by
open_clip, so both sides hold the very same weights (checked: the features must
agree). Both are timed through their public calls (`model.encode_image(array)`,
torch `model.encode_image(tensor)` under inference_mode), interleaved, in one process.
Threads: torch.set_num_threads(N); XLA's CPU pool follows the process CPU affinity,
which is narrowed to N cores (see _timing.pin_threads). No XLA_FLAGS are changed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import numpy as np

import _timing

TARGET = 1.1


# ----------------------------------------------------------------------------- layer variants
# Candidate changes to bioclip_jax.models.layers, tried here by patching the class while a
# program is traced, so that "ours as is" and "ours with the change" run side by side.


def _token_major_attention(self, x, mask):
    """The layout before head-major attention: q/k/v [batch, tokens, heads, head_dim], so both
    attention contractions batch over non-leading axes (kept to show what the change bought)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    dtype = x.dtype
    q, k, v = (jnp.einsum("btd,dhk->bthk", x, kernel[...].astype(dtype)) + bias[...].astype(dtype)
               for kernel, bias in ((self.query, self.query_bias), (self.key, self.key_bias),
                                    (self.value, self.value_bias)))
    logits = jnp.einsum("bqhk,bshk->bhqs", q * jnp.asarray(q.shape[-1] ** -0.5, dtype), k).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    context = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1).astype(dtype), v)
    return jnp.einsum("bqhk,hkd->bqd", context, self.out[...].astype(dtype)) + self.out_bias[...].astype(dtype)


def _fused_qkv_attention(self, x, mask):
    """q, k and v from one [width, 3 * width] GEMM (like torch's in_proj), the kernels
    concatenated per call; one larger GEMM instead of three."""
    import jax.numpy as jnp  # noqa: PLC0415

    dtype = x.dtype
    b, t, width = x.shape
    heads, head_dim = self.query.shape[1:]
    kernel = jnp.concatenate([p[...].reshape(width, width) for p in (self.query, self.key, self.value)], axis=1)
    bias = jnp.concatenate([p[...].reshape(width) for p in (self.query_bias, self.key_bias, self.value_bias)])
    qkv = x.reshape(b * t, width) @ kernel.astype(dtype) + bias.astype(dtype)
    q, k, v = qkv.reshape(b, t, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
    return self.attend(q, k, v, mask)


def _unrolled_transformer(self, x, mask=None):
    """The blocks as a Python loop even where the model runs them in lax.scan (training)."""
    return self.unrolled(x, mask)


VARIANTS = {"token-major-attention": ("Attention", "__call__", _token_major_attention),
            "fused-qkv": ("Attention", "__call__", _fused_qkv_attention),
            "unrolled-layers": ("Transformer", "__call__", _unrolled_transformer)}


def variant_names(spec: str) -> list[str]:
    """'a+b' -> ['a', 'b'], each a key of VARIANTS (for argparse `type=`)."""
    names = [part for part in spec.split("+") if part]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown variant {spec!r}; choose from {', '.join(sorted(VARIANTS))}, "
                                         f"or join several with '+'")
    return names


@contextlib.contextmanager
def layer_variant(spec: str | None):
    """Patches methods of bioclip_jax.models.layers ('a+b' applies both) for programs traced inside."""
    if spec is None:
        yield
        return
    from bioclip_jax.models import layers  # noqa: PLC0415

    undo = []
    for name in variant_names(spec):
        class_name, method, replacement = VARIANTS[name]
        cls = getattr(layers, class_name)
        undo.append((cls, method, getattr(cls, method)))
        setattr(cls, method, replacement)
    try:
        yield
    finally:
        for cls, method, original in reversed(undo):
            setattr(cls, method, original)


def traced_encoder(model, tower: str, variant: str | None):
    """A fresh jitted encoder of `model` (own compile cache), traced with `variant` patched in."""
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, inputs):
        merged = nnx.merge(graphdef, state)
        return merged.image_features(inputs) if tower == "image" else merged.text_features(inputs)

    def run(inputs):
        with layer_variant(variant):  # only the first call traces; later calls reuse the program
            return jax.block_until_ready(encode(state, inputs))

    return run


def twin_models(name: str, seed: int = 0, dtype=None):
    """(bioclip_jax model, open_clip model) with identical random weights, via our open_clip export."""
    import jax.numpy as jnp  # noqa: PLC0415
    import open_clip  # noqa: PLC0415

    import bioclip_jax  # noqa: PLC0415

    ours = bioclip_jax.create_model(name, None, seed=seed, dtype=dtype or jnp.float32)
    with tempfile.TemporaryDirectory(prefix="bioclip_jax_bench_") as folder:
        bioclip_jax.export_open_clip(ours, folder)
        reference = open_clip.create_model_and_transforms(f"local-dir:{folder}")[0]
    return ours, reference


def random_inputs(image_size: int, images: int, texts: int, seed: int = 0):
    """Normalised-looking images [B, H, W, 3] and token rows shaped like real captions (SOT ... EOT, 0s)."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((images, image_size, image_size, 3)).astype(np.float32)
    tokens = np.zeros((texts, 77), np.int64)
    for row, length in enumerate(rng.integers(8, 40, texts)):
        tokens[row, 0], tokens[row, length - 1] = 49406, 49407
        tokens[row, 1:length - 1] = rng.integers(1, 49406, length - 2)
    return pixels, tokens


def _check_same_outputs(ours, reference, pixels, tokens) -> float:
    """Largest relative difference of the two sides' features (guards against timing different models)."""
    import torch  # noqa: PLC0415

    with torch.inference_mode():
        ref_image = reference.encode_image(torch.from_numpy(pixels[:2].transpose(0, 3, 1, 2).copy())).numpy()
        ref_text = reference.encode_text(torch.from_numpy(tokens[:2])).numpy()
    errors = [np.abs(a - b).max() / np.abs(b).max()
              for a, b in ((ours.encode_image(pixels[:2]), ref_image), (ours.encode_text(tokens[:2]), ref_text))]
    return float(max(errors))


# ----------------------------------------------------------------------------- timing


def measure(name: str, pixels: np.ndarray, tokens: np.ndarray, repeats: int, warmup: int, bf16: bool,
            towers: tuple[str, ...], variant: str | None = None) -> list[dict]:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from bioclip_jax.models.clip import used_text_length  # noqa: PLC0415

    ours, reference = twin_models(name, dtype=jnp.bfloat16 if bf16 else jnp.float32)
    reference.eval()
    if not bf16:
        error = _check_same_outputs(ours, reference, pixels, tokens)
        print(f"same weights: max relative feature difference {error:.1e}")
        if error > 1e-3:
            raise RuntimeError(f"the two models disagree (relative error {error:.1e}); the timing would be meaningless")
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    torch_tokens = torch.from_numpy(tokens)
    int_tokens = tokens.astype(np.int32)

    def torch_call(encode, inputs):
        def run():
            with torch.inference_mode(), autocast():
                encode(inputs)
        return run

    calls = {"image": (lambda: jax.block_until_ready(ours.encode_image(pixels)),
                       torch_call(reference.encode_image, torch_pixels), len(pixels)),
             "text": (lambda: jax.block_until_ready(ours.encode_text(int_tokens)),
                      torch_call(reference.encode_text, torch_tokens), len(tokens))}
    rows = []
    for tower in towers:
        run_ours, run_reference, items = calls[tower]
        contenders = {_timing.OURS: run_ours, _timing.REFERENCE: run_reference}
        difference = None
        if variant is not None:
            # encode_text cuts rows after the batch's last end-of-text token; so must the variant.
            used = used_text_length(int_tokens, ours.config.text.context_length)
            inputs = pixels if tower == "image" else int_tokens[:, :used]
            changed = traced_encoder(ours, tower, variant)
            as_is = ours.encode_image(pixels) if tower == "image" else ours.encode_text(int_tokens)
            difference = float(np.abs(changed(inputs) - as_is).max() / np.abs(as_is).max())
            print(f"{tower} {variant}: max relative difference to ours as is {difference:.1e}")
            contenders[variant] = lambda changed=changed, inputs=inputs: changed(inputs)
        label = f"{tower} {'bf16' if bf16 else 'fp32'} (B={items})"
        tower_rows = _timing.with_variant(label, contenders, variant, items, repeats, warmup)
        for row in tower_rows[1:]:
            row["relative_difference_to_ours"] = difference
        _timing.print_rows(tower_rows, TARGET)
        rows += tower_rows
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="architecture name (default %(default)s)")
    parser.add_argument("--images", type=int, default=32, help="images per encode_image call (default %(default)s)")
    parser.add_argument("--texts", type=int, default=256, help="captions per encode_text call (default %(default)s)")
    parser.add_argument("--towers", default="image,text", help="comma-separated: image, text")
    parser.add_argument("--bf16", action="store_true", help="also time bfloat16 compute, reported separately")
    parser.add_argument("--variant", help=f"also time ours with candidate changes to models/layers.py against ours "
                                          f"as is: {', '.join(sorted(VARIANTS))}, or several joined by '+'")
    _timing.add_common_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.texts, args.repeats = min(args.images, 4), min(args.texts, 16), min(args.repeats, 2)
    if args.variant:
        try:
            variant_names(args.variant)
        except argparse.ArgumentTypeError as error:
            parser.error(f"--variant: {error}")
    towers = tuple(t.strip() for t in args.towers.split(",") if t.strip())
    unknown = set(towers) - {"image", "text"}
    if unknown or not towers:
        parser.error(f"--towers {args.towers!r}: choose from image, text")
    args.towers = towers
    if min(args.images, args.texts, args.repeats) < 1:
        parser.error("--images, --texts and --repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = _timing.pin_threads(args.threads)
    _timing.warn_if_busy(threads)
    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415

    size = get_model_config(args.model).vision.image_size
    pixels, tokens = random_inputs(size, args.images, args.texts)
    print(f"{args.model}: {args.images} images / {args.texts} texts per call, {threads} threads, "
          f"{args.repeats} interleaved rounds")
    machine_before = _timing.machine_info(threads)
    rows = measure(args.model, pixels, tokens, args.repeats, args.warmup, False, args.towers, args.variant)
    if args.bf16:
        rows += measure(args.model, pixels, tokens, args.repeats, args.warmup, True, args.towers, args.variant)
    print()
    _timing.print_rows(rows, TARGET)
    _timing.write_json(args.out, {"benchmark": "encode", "args": vars(args), "target_ratio": TARGET,
                                  "machine": machine_before, "load_average_after": os.getloadavg(),
                                  "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
