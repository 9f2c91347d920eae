"""encode_image / encode_text throughput of bioclip_jax vs open_clip: same CPU, weights, batch and threads.

    python benchmarks/encode.py                       # ViT-B-16, 32 images / 256 texts, fp32, 5 rounds
    python benchmarks/encode.py --quick               # < 1 minute: small batches, 2 rounds
    python benchmarks/encode.py --bf16 --out r.json   # also time bfloat16 (JAX dtype / torch autocast)
    python benchmarks/encode.py --towers image --gemms  # also time the image tower's GEMMs alone: the ceiling

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
import math
import os
import sys
import tempfile

import numpy as np

import _timing

TARGET = 1.1


# ----------------------------------------------------------------------------- layer variants
# Candidate changes to bioclip_jax.models.layers, tried here by patching the class while a
# program is traced, so that "ours as is" and "ours with the change" run side by side.


def _separate_qkv_attention(self, x, mask, kernel=None, valid_tokens=None):
    """q, k and v from three GEMMs, one per kernel, as before they were joined into one."""
    import jax.numpy as jnp  # noqa: PLC0415

    from bioclip_jax.models import attention  # noqa: PLC0415

    dtype = x.dtype
    kernel = kernel or attention.resolve(self.implementation, dtype, head_dim=self.head_dim)
    spec = "btd,dhk->bhtk" if kernel == attention.HEAD_MAJOR else "btd,dhk->bthk"
    q, k, v = (jnp.einsum(spec, x, weight[...].astype(dtype))
               + (bias[...].astype(dtype)[:, None] if kernel == attention.HEAD_MAJOR else bias[...].astype(dtype))
               for weight, bias in ((self.query, self.query_bias), (self.key, self.key_bias),
                                    (self.value, self.value_bias)))
    if kernel == attention.HEAD_MAJOR:
        return self.attend(q, k, v, mask, valid_tokens)
    return self.output(attention.fused(q, k, v, mask, kernel, valid_tokens), "bqhk")


def _unrolled_transformer(self, x, mask, kernel, valid_tokens):
    """The blocks as a Python loop even where the model runs them in lax.scan (training)."""
    return self.unrolled(x, mask, kernel, valid_tokens)


VARIANTS = {"separate-qkv": ("Attention", "__call__", _separate_qkv_attention),
            "unrolled-layers": ("Transformer", "scanned", _unrolled_transformer)}


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


# ----------------------------------------------------------------------------- GEMM ceiling
# If everything but its matrix products were free, bioclip_jax's encode_image would take the sum
# of its GEMM times; open_clip's whole encode_image over that sum is the best ratio reachable
# with this jaxlib's GEMMs (XLA:CPU runs them through YNNPACK unless XLA_FLAGS say otherwise).


def image_tower_gemms(name: str, images: int) -> list[dict]:
    """The matrix products of one encode_image pass on `images` images, one entry per distinct shape.

    Plain [M, K] x [K, N] or batched [G, M, K] x [G, K, N] products with their count per pass;
    bias, GELU, softmax, LayerNorm and layout changes around them are left out on purpose.
    """
    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415

    config = get_model_config(name)
    vision = config.vision
    width, mlp, layers = vision.width, vision.mlp_width, vision.layers
    patches, tokens = images * vision.grid ** 2, vision.grid ** 2 + 1
    rows, heads, head_dim = images * tokens, images * vision.heads, width // vision.heads
    patch_in = vision.patch_size ** 2 * 3
    products = [("patch embedding", (patches, patch_in), (patch_in, width), 1),
                ("q, k, v, out projections", (rows, width), (width, width), 4 * layers),
                ("MLP fc", (rows, width), (width, mlp), layers),
                ("MLP proj", (rows, mlp), (mlp, width), layers),
                ("attention q.k", (heads, tokens, head_dim), (heads, head_dim, tokens), layers),
                ("attention weights.v", (heads, tokens, tokens), (heads, tokens, head_dim), layers),
                ("final projection", (images, width), (width, config.embed_dim), 1)]
    distinct: dict[tuple, dict] = {}
    for what, a, b, count in products:
        entry = distinct.setdefault((a, b), {"what": [], "a": a, "b": b, "count": 0})
        entry["what"].append(what)
        entry["count"] += count
    return [dict(entry, what=" + ".join(entry["what"]), gflop_per_call=2 * math.prod(entry["a"]) * entry["b"][-1] / 1e9)
            for entry in distinct.values()]


def _time_gemm(product: dict, repeats: int, warmup: int) -> dict:
    """One shape alone, fp32: jitted jnp.matmul against torch `@` (bmm when batched), interleaved."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(shape, dtype=np.float32) for shape in (product["a"], product["b"]))
    jax_a, jax_b, torch_a, torch_b = jax.device_put(a), jax.device_put(b), torch.from_numpy(a), torch.from_numpy(b)
    matmul = jax.jit(jnp.matmul)

    def torch_matmul():
        with torch.inference_mode():
            return torch_a @ torch_b

    shape = "x".join(f"[{','.join(map(str, s))}]" for s in (product["a"], product["b"]))
    row = _timing.side_by_side(shape, lambda: jax.block_until_ready(matmul(jax_a, jax_b)), torch_matmul,
                               1, repeats, warmup, unit="calls/s")
    for side in row["sides"]:
        row[side]["gflops_best"] = product["gflop_per_call"] / row[side]["min_s"]
        row[side]["gflops_median"] = product["gflop_per_call"] / row[side]["median_s"]
    return dict(product, **row)


def gemm_ceiling(name: str, images: int, repeats: int, warmup: int, tower_rows: list[dict]) -> dict:
    """Times every distinct GEMM shape of the image tower, prints the table and the ceiling, returns both.

    The ceiling needs open_clip's encode_image time from `tower_rows` (same run, same batch);
    without an fp32 image row it is reported as not available.
    """
    xla_flags = os.environ.get("XLA_FLAGS") or "(default: YNNPACK)"
    print(f"\nGEMMs of one {name} encode_image pass (B={images}), fp32, each shape alone; XLA_FLAGS: {xla_flags}")
    rows = [_time_gemm(product, repeats, warmup) for product in image_tower_gemms(name, images)]
    sides = (_timing.OURS, _timing.REFERENCE)
    print(f"{'product':<26} {'shape':<28} {'count':>5} {'GFLOP':>7}"
          + "".join(f" {side + ' ms best':>19} {'median':>8} {'GFLOP/s':>8}" for side in sides)
          + f" {'ratio(med)':>10}")
    for row in rows:
        print(f"{row['what']:<26} {row['label']:<28} {row['count']:5d} {row['gflop_per_call']:7.3f}"
              + "".join(f" {row[side]['min_s'] * 1e3:19.1f} {row[side]['median_s'] * 1e3:8.1f} "
                        f"{row[side]['gflops_median']:8.1f}" for side in sides)
              + f" {row['ratio_of_medians']:9.2f}x")
    totals = {side: {stat: sum(row["count"] * row[side][stat] for row in rows) for stat in ("min_s", "median_s")}
              for side in sides}
    gemm_ratio = {f"ratio_of_{stat[:-2]}s": totals[_timing.REFERENCE][stat] / totals[_timing.OURS][stat]
                  for stat in ("min_s", "median_s")}
    print("GEMM sum over the pass (count x time), best / median: "
          + ", ".join(f"{side} {totals[side]['min_s'] * 1e3:.0f} / {totals[side]['median_s'] * 1e3:.0f} ms"
                      for side in sides))
    print(f"GEMM-for-GEMM ratio ({_timing.REFERENCE} sum / {_timing.OURS} sum): "
          f"{gemm_ratio['ratio_of_mins']:.2f}x by minima, {gemm_ratio['ratio_of_medians']:.2f}x by medians")
    tower = next((row for row in tower_rows if row["label"] == f"image fp32 (B={images})"
                  and row["sides"] == list(sides)), None)
    ceiling = encode_image_s = share = None
    if tower is None:
        print("ceiling: not available (the fp32 image tower was not timed in this run; add --towers image)")
    else:
        encode_image_s = {side: {stat: tower[side][stat] for stat in ("min_s", "median_s")} for side in sides}
        ceiling = {f"ratio_of_{stat[:-2]}s": encode_image_s[_timing.REFERENCE][stat] / totals[_timing.OURS][stat]
                   for stat in ("min_s", "median_s")}
        share = {side: totals[side]["median_s"] / encode_image_s[side]["median_s"] for side in sides}
        print("GEMMs' share of the whole encode_image (medians): "
              + ", ".join(f"{side} {share[side]:.0%}" for side in sides))
        print(f"ceiling ({_timing.REFERENCE} encode_image / {_timing.OURS} GEMM sum): "
              f"{ceiling['ratio_of_mins']:.2f}x by minima, {ceiling['ratio_of_medians']:.2f}x by medians "
              f"(target {TARGET}x)")
    return {"model": name, "images": images, "dtype": "float32", "xla_flags": xla_flags, "rows": rows,
            "totals": totals, "gemm_ratio": gemm_ratio, "encode_image_s": encode_image_s,
            "gemm_share_of_encode_image": share, "ceiling": ceiling}


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
    parser.add_argument("--gemms", action="store_true",
                        help="also time each GEMM shape of the image tower alone (fp32) and print the ceiling: "
                             "open_clip's encode_image over our GEMM-only time (--towers '' skips the towers)")
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
    if unknown or not (towers or args.gemms):
        parser.error(f"--towers {args.towers!r}: choose from image, text (or '' with --gemms)")
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
    rows = []
    if args.towers:  # empty only with --gemms and no ceiling wanted
        rows = measure(args.model, pixels, tokens, args.repeats, args.warmup, False, args.towers, args.variant)
        if args.bf16:
            rows += measure(args.model, pixels, tokens, args.repeats, args.warmup, True, args.towers, args.variant)
        print()
        _timing.print_rows(rows, TARGET)
    gemms = gemm_ceiling(args.model, args.images, args.repeats, args.warmup, rows) if args.gemms else None
    _timing.write_json(args.out, {"benchmark": "encode", "args": vars(args), "target_ratio": TARGET,
                                  "machine": machine_before, "load_average_after": os.getloadavg(),
                                  "rows": rows, "gemms": gemms})
    return 0


if __name__ == "__main__":
    sys.exit(main())
