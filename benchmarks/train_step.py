"""Contrastive train-step images/s of bioclip_jax vs open_clip (forward + backward + AdamW), side by side.

    python benchmarks/train_step.py                     # CPU, ViT-B-16, global batch 16, fp32
    python benchmarks/train_step.py --quick             # < 1 minute: ViT-Tiny-8, batch 8, 2 rounds
    python benchmarks/train_step.py --device gpu        # bf16, batch 256, MFU against the device peak
    python benchmarks/train_step.py --remat dots_with_no_batch_dims_saveable --attention xla
    python benchmarks/train_step.py --memory            # per-device memory of the loss, batch 256 -> 4096
    python benchmarks/train_step.py --loop              # the whole training loop's images/s vs the bare step

Ours is `bioclip_jax.train.step.make_train_step` exactly as the training loop builds
it (uint8 images normalised on the device, sharded contrastive loss, AdamW with
open_clip's decay mask, logit-scale clamp, donated state). The reference is the
step of open_clip_train: the same weights (exported from ours), `ClipLoss`, torch
AdamW with open_clip_train's two parameter groups, `logit_scale.clamp_` after the
update, and for bf16 `torch.autocast(bfloat16)` as `--precision amp_bf16` does.
It receives images already normalised in float32, as its data loader delivers them.

--memory first reads, from the traced gradient of each tower of --model (bf16), the activations
kept for the backward pass per image-text pair for remat none, minimal and full. It then compiles
(never runs) on 8 simulated CPU devices and reads each program's `memory_analysis()`: the loss and
its gradient alone on [B, D] features, and the full train step of a tiny model, for B = 256 .. 4096;
then the same total batch run as --accumulate-steps micro-batches with global negatives (the same
update) against the full step, and the saving in temporaries.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import numpy as np

import _timing
from encode import VARIANTS, layer_variant, random_inputs, twin_models, variant_names

CPU_TARGET, GPU_TARGET, GPU_MFU_TARGET = 1.1, 1.3, 0.45
MEMORY_DEVICES = 8


# ----------------------------------------------------------------------------- ours


def jax_step(model_name: str, batch: int, dtype: str, remat: bool | str, devices, accumulate_steps: int = 1,
             attention: str = "auto", scan_layers: bool = True):
    """(config, mesh, layout, jitted step) built as bioclip_jax.train.loop builds them.

    `remat`: none, full or a jax.checkpoint_policies name (True/False: full/none); `attention`:
    the config's kernel choice (auto, xla, cudnn, head_major)."""
    from bioclip_jax.models import remat as remat_lib  # noqa: PLC0415
    from bioclip_jax.parallel.mesh import make_mesh  # noqa: PLC0415
    from bioclip_jax.train import state as state_lib  # noqa: PLC0415
    from bioclip_jax.train.config_base import base_config  # noqa: PLC0415
    from bioclip_jax.train.optimizer import make_schedule  # noqa: PLC0415
    from bioclip_jax.train.step import make_train_step  # noqa: PLC0415

    config = base_config()
    config.model.name, config.dtype, config.remat = model_name, dtype, remat_lib.check(remat)
    config.attention, config.scan_layers = attention, scan_layers
    config.data.batch_size = batch
    config.optimizer.accumulate_steps = accumulate_steps  # global negatives: `batch` is still the whole batch
    config.total_steps = 100_000
    config.schedule.name, config.schedule.warmup_steps = "constant", 0  # lr 1e-4, as the reference's AdamW
    mesh = make_mesh(devices=devices)
    skeleton = state_lib.model_skeleton(config)
    layout = state_lib.state_layout(config, skeleton, mesh)
    step = make_train_step(config, skeleton, layout, mesh, make_schedule(config, config.total_steps))
    return config, mesh, layout, step


def model_params(model) -> dict:
    """A model's parameters as the train state holds them: {"visual.ln_pre.scale": numpy array}."""
    from bioclip_jax.checkpoint.model_dir import path_to_key  # noqa: PLC0415
    from bioclip_jax.models.params import flat_params  # noqa: PLC0415

    return {path_to_key(p): np.asarray(v) for p, v in flat_params(model).items()}


def jax_trainer(params: dict, model_name: str, batch: int, dtype: str, remat: bool | str, devices,
                attention: str = "auto", scan_layers: bool = True):
    """`train(batch) -> loss`: our train step, state carried over (and donated); `train.place` puts a batch on
    the mesh."""
    import jax  # noqa: PLC0415

    from bioclip_jax.parallel.sharding import host_batch_to_global  # noqa: PLC0415
    from bioclip_jax.train.state import initial_state  # noqa: PLC0415

    _, mesh, layout, step = jax_step(model_name, batch, dtype, remat, devices, attention=attention,
                                     scan_layers=scan_layers)
    holder = {"state": initial_state(layout, params)}

    def place(host_batch: dict) -> dict:
        return host_batch_to_global({"image": host_batch["image"], "tokens": host_batch["tokens"]}, mesh)

    def train(batch: dict, wait: bool = True):
        """One step on a batch from `place`, or on host numpy arrays (placed here, as the loop does).

        Returns the loss as a float, or with `wait=False` as a device array, without waiting for
        the step: the host queues the next step meanwhile, as the training loop does."""
        if not isinstance(batch["image"], jax.Array):
            batch = place(batch)
        holder["state"], metrics = step(holder["state"], batch)
        if not wait:
            return metrics["loss"]
        jax.block_until_ready(holder["state"])
        return float(metrics["loss"])

    train.place = place
    return train


# ----------------------------------------------------------------------------- reference


def torch_runner(reference, images_uint8, tokens, bf16: bool, device: str, wait: bool = True):
    """open_clip_train's step: zero_grad, autocast forward, ClipLoss, backward, AdamW, clamp.

    With `wait=False` a step neither synchronises nor reads its loss (`holder["losses"]` gets the
    loss tensor), so kernels of the next step queue behind it, as in open_clip_train's loop."""
    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from bioclip_jax.models.config import OPENAI_MEAN, OPENAI_STD  # noqa: PLC0415

    model = reference.to(device).train()
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=1e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.loss.ClipLoss()
    pixels = (images_uint8.astype(np.float32) / 255.0 - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(
        OPENAI_STD, np.float32)
    images = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).to(device)
    texts = torch.from_numpy(tokens.astype(np.int64)).to(device)
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    holder = {}

    def run():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            image_features, text_features, logit_scale = model(images, texts)
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if not wait:
            holder.setdefault("losses", []).append(loss.detach())
            return
        if device == "cuda":
            torch.cuda.synchronize()
        holder.setdefault("losses", []).append(float(loss.detach()))

    return run, holder


# ----------------------------------------------------------------------------- speed


def train_inputs(image_size: int, batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
    return images, random_inputs(image_size, 0, batch, seed)[1]


def _add_mfu(rows: list[dict], flops_per_step: float, devices: int, peak: float) -> None:
    """Model TFLOP/s per device and MFU (against `peak`) of every side's best step, printed once per side."""
    printed = set()
    for row in rows:
        for side in row["sides"]:
            tflops = flops_per_step / row[side]["min_s"] / devices / 1e12
            row[side]["model_tflops_per_device_best"] = tflops
            row[side]["mfu_best"] = tflops / peak if math.isfinite(peak) else None
            if side not in printed:
                printed.add(side)
                mfu = f", MFU {tflops / peak:.1%} of {peak:.0f} TFLOP/s" if math.isfinite(peak) else " (no known peak)"
                print(f"{side}: {tflops:.3f} model TFLOP/s per device at best{mfu}")


def measure_speed(args) -> dict:
    import jax  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415
    from bioclip_jax.train.step import device_peak_tflops, model_flops_per_pair  # noqa: PLC0415

    gpu = args.device == "gpu"
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device gpu: torch sees no CUDA device")
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True  # as open_clip_train sets on CUDA
        torch.backends.cudnn.benchmark = True
    devices = jax.devices("gpu" if gpu else "cpu")[:1]
    arch = get_model_config(args.model)
    images, tokens = train_inputs(arch.vision.image_size, args.batch)
    ours_model, reference = twin_models(args.model)
    params = model_params(ours_model)
    del ours_model
    if args.remat != "none":  # torch has one kind: every block recomputed
        reference.set_grad_checkpointing(True)
    run_torch, torch_out = torch_runner(reference, images, tokens, args.dtype == "bfloat16", "cuda" if gpu else "cpu")
    del reference
    train = jax_trainer(params, args.model, args.batch, args.dtype, args.remat, devices, args.attention)
    placed = train.place({"image": images, "tokens": tokens.astype(np.int32)})  # on the device, like torch's
    jax_losses = []
    contenders = {_timing.OURS: lambda: jax_losses.append(train(placed)), _timing.REFERENCE: run_torch}
    if args.variant:
        contenders[args.variant] = variant_runner(args, params, placed, devices)
    print(f"{args.model}, global batch {args.batch}, {args.dtype}, remat={args.remat}, attention={args.attention}, on "
          f"{devices[0].device_kind} / torch {'cuda' if gpu else 'cpu'}; {args.repeats} interleaved rounds")
    rows = _timing.with_variant(f"train step {args.dtype} (B={args.batch})", contenders, args.variant, args.batch,
                                args.repeats, args.warmup, unit="images/s")
    rows[0]["losses"] = {_timing.OURS: jax_losses, _timing.REFERENCE: torch_out["losses"]}
    if args.variant:
        rows[1]["losses"] = {args.variant: contenders[args.variant].losses}
    target = GPU_TARGET if gpu else CPU_TARGET
    _timing.print_rows(rows, target)
    print("losses step by step (same weights, data and optimiser, so they should track each other):")
    for side, losses in {**rows[0]["losses"], **(rows[1]["losses"] if args.variant else {})}.items():
        print(f"  {side:24} {' '.join(f'{v:.5f}' for v in losses)}")
    peak = device_peak_tflops(args.peak_tflops)
    _add_mfu(rows, model_flops_per_pair(arch) * args.batch, len(devices), peak)
    if gpu and rows[0][_timing.OURS]["mfu_best"] is not None and rows[0][_timing.OURS]["mfu_best"] < GPU_MFU_TARGET:
        print(f"below the {GPU_MFU_TARGET:.0%} MFU target")
    return {"rows": rows, "target_ratio": target, "peak_tflops": peak if math.isfinite(peak) else None,
            "mfu_target": GPU_MFU_TARGET if gpu else None, "device_kind": devices[0].device_kind}


def variant_runner(args, params: dict, placed: dict, devices):
    """Our step with candidate layers.py changes (see encode.VARIANTS), as its own program and state."""
    changed = jax_trainer(params, args.model, args.batch, args.dtype, args.remat, devices, args.attention)

    def run():
        with layer_variant(args.variant):  # the first (warm-up) call traces the step
            run.losses.append(changed(placed))

    run.losses = []
    return run


# ----------------------------------------------------------------------------- memory


def _bytes(compiled) -> dict:
    stats = compiled.memory_analysis()
    return {"temp": int(stats.temp_size_in_bytes), "arguments": int(stats.argument_size_in_bytes),
            "outputs": int(stats.output_size_in_bytes)}


def loss_memory(global_batch: int, embed_dim: int, devices) -> dict:
    """Per-device bytes of the sharded loss + its gradient on [B, D] features over `devices`."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec  # noqa: PLC0415

    from bioclip_jax.parallel.mesh import make_mesh  # noqa: PLC0415
    from bioclip_jax.parallel.sharding import batch_sharding  # noqa: PLC0415
    from bioclip_jax.train.loss import contrastive_loss  # noqa: PLC0415

    mesh = make_mesh(devices=devices)
    rows = batch_sharding(mesh)
    features = jax.ShapeDtypeStruct((global_batch, embed_dim), jnp.float32, sharding=rows)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    grad = jax.value_and_grad(lambda i, t, s: contrastive_loss(i, t, s, mesh)[0], argnums=(0, 1, 2))
    return _bytes(jax.jit(grad).lower(features, features, scale).compile())


def dense_loss_memory(global_batch: int, embed_dim: int, device) -> dict:
    """Bytes of the single-device [B, B] formulation (what a naive implementation puts on one device)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from bioclip_jax.train.loss import dense_contrastive_loss  # noqa: PLC0415

    sharding = jax.sharding.SingleDeviceSharding(device)
    features = jax.ShapeDtypeStruct((global_batch, embed_dim), jnp.float32, sharding=sharding)
    scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)
    grad = jax.value_and_grad(lambda i, t, s: dense_contrastive_loss(i, t, s)[0], argnums=(0, 1, 2))
    return _bytes(jax.jit(grad).lower(features, features, scale).compile())


def step_memory(model_name: str, global_batch: int, devices, accumulate_steps: int = 1) -> dict:
    """Per-device bytes of the whole compiled train step (tiny model) at this global batch,
    run as `accumulate_steps` micro-batches with global negatives."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415
    from bioclip_jax.parallel.sharding import batch_sharding  # noqa: PLC0415

    _, mesh, layout, step = jax_step(model_name, global_batch, "float32", False, devices, accumulate_steps)
    size = get_model_config(model_name).vision.image_size
    abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  layout.abstract, layout.shardings)
    rows = batch_sharding(mesh)
    batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8, sharding=rows),
             "tokens": jax.ShapeDtypeStruct((global_batch, 77), jnp.int32, sharding=rows)}
    return _bytes(step.lower(abstract_state, batch).compile())


def _growth(values: list[float]) -> list[str]:
    """Growth exponent between consecutive rows: 1 = linear, 2 = quadratic in the batch."""
    return ["-"] + [f"{math.log2(b / a):.2f}" if a > 0 and b > 0 else "n/a" for a, b in zip(values, values[1:])]


def measure_memory(args) -> dict:
    import jax  # noqa: PLC0415

    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415

    devices = jax.devices("cpu")
    if len(devices) < MEMORY_DEVICES:
        raise SystemExit(f"--memory needs {MEMORY_DEVICES} simulated CPU devices, found {len(devices)}")
    devices = devices[:MEMORY_DEVICES]
    embed_dim = get_model_config(args.model).embed_dim
    mib = 2.0 ** 20
    strong = []
    for batch in args.memory_batches:
        strong.append({"global_batch": batch,
                       "loss_temp_per_device": loss_memory(batch, embed_dim, devices)["temp"],
                       "dense_loss_temp_one_device": dense_loss_memory(batch, embed_dim, devices[0])["temp"],
                       "step": step_memory(args.memory_model, batch, devices)})
    print(f"\nFixed {MEMORY_DEVICES} devices; loss on [B, {embed_dim}] features; full step of {args.memory_model}."
          f" Temp MiB per device (growth exponent per doubling: 1 linear, 2 quadratic)")
    print(f"{'B':>6} {'loss':>9} {'exp':>5} {'dense[B,B]':>11} {'exp':>5} {'step temp':>10} {'exp':>5} "
          f"{'step args':>10}")
    loss_growth = _growth([r["loss_temp_per_device"] for r in strong])
    dense_growth = _growth([r["dense_loss_temp_one_device"] for r in strong])
    step_growth = _growth([r["step"]["temp"] for r in strong])
    for r, lg, dg, sg in zip(strong, loss_growth, dense_growth, step_growth):
        print(f"{r['global_batch']:6d} {r['loss_temp_per_device'] / mib:9.2f} {lg:>5} "
              f"{r['dense_loss_temp_one_device'] / mib:11.2f} {dg:>5} {r['step']['temp'] / mib:10.2f} {sg:>5} "
              f"{r['step']['arguments'] / mib:10.2f}")
    weak = []
    per_device = args.memory_batches[0]
    for count in (1, 2, 4, 8):
        weak.append({"devices": count, "global_batch": per_device * count,
                     "loss_temp_per_device": loss_memory(per_device * count, embed_dim, devices[:count])["temp"]})
    print(f"\n{per_device} rows per device, 1 -> {MEMORY_DEVICES} devices (each device's block is "
          f"[{per_device}, B]): loss temp MiB per device")
    for r, g in zip(weak, _growth([r["loss_temp_per_device"] for r in weak])):
        print(f"{r['devices']:3d} devices  B={r['global_batch']:5d}  {r['loss_temp_per_device'] / mib:9.2f}  exp {g}")
    return {"saved_activations": saved_activation_table(args.model),
            "fixed_devices": strong, "fixed_rows_per_device": weak,
            "accumulated": accumulation_memory(args, strong, devices)}


def saved_activation_table(model_name: str) -> list[dict]:
    """MiB per image-text pair that each tower's bf16 gradient keeps for its backward pass, per remat choice
    (attention=xla; cuDNN keeps less: no [T, T] weights)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415
    from bioclip_jax.models.saved_activations import saved_bytes_per_pair  # noqa: PLC0415

    arch, mib = get_model_config(model_name), 2.0 ** 20
    rows = []
    print(f"\n{model_name} bf16, attention=xla: activations kept for the backward pass, MiB per pair")
    print(f"{'remat':>8} {'image':>8} {'text':>8} {'both':>8}")
    for choice in ("none", "minimal", "full"):
        image, text = (saved_bytes_per_pair(arch, tower, dtype=jnp.bfloat16, remat=choice, attention="xla") / mib
                       for tower in ("image", "text"))
        rows.append({"remat": choice, "image_mib": image, "text_mib": text})
        print(f"{choice:>8} {image:8.1f} {text:8.1f} {image + text:8.1f}")
    return rows


def accumulation_memory(args, full_steps: list[dict], devices) -> list[dict]:
    """The same total batch as one step and as k micro-batches with global negatives (the same update)."""
    k, mib = args.accumulate_steps, 2.0 ** 20
    rows = []
    for full in full_steps:
        batch = full["global_batch"]
        if batch % (k * MEMORY_DEVICES):
            continue
        accumulated = step_memory(args.memory_model, batch, devices, k)
        rows.append({"global_batch": batch, "accumulate_steps": k, "full_step": full["step"],
                     "accumulated_step": accumulated,
                     "temp_saving": 1.0 - accumulated["temp"] / full["step"]["temp"]})
    print(f"\n{args.memory_model}, same total batch as one step and as optimizer.accumulate_steps={k} micro-batches "
          f"(global negatives): MiB per device")
    print(f"{'B':>6} {'full temp':>10} {'accum temp':>11} {'saving':>7} {'full args':>10} {'accum args':>11}")
    for r in rows:
        full, acc = r["full_step"], r["accumulated_step"]
        print(f"{r['global_batch']:6d} {full['temp'] / mib:10.2f} {acc['temp'] / mib:11.2f} {r['temp_saving']:7.1%} "
              f"{full['arguments'] / mib:10.2f} {acc['arguments'] / mib:11.2f}")
    return rows


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    from bioclip_jax.models import remat as remat_lib  # noqa: PLC0415
    from bioclip_jax.models.attention import CHOICES as attention_kernels  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="architecture (default ViT-B-16; ViT-Tiny-8 with --quick)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--batch", type=int, help="global batch (default 16 on cpu: 32 needs ~12 GB free for both "
                                                  "frameworks; 256 on gpu; 8 with --quick)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="compute dtype (default float32 on cpu, bfloat16 on gpu)")
    parser.add_argument("--remat", nargs="?", const="full", default="none",
                        help="what our blocks recompute in the backward pass: none (default), full (bare --remat) "
                             "or a jax.checkpoint_policies name; open_clip recomputes every block unless none")
    parser.add_argument("--attention", default="auto", choices=attention_kernels,
                        help="our attention kernel (default auto: cuDNN on GPU in bf16, head-major on CPU)")
    parser.add_argument("--variant", help=f"also time our step with candidate changes to models/layers.py against "
                                          f"ours as is: {', '.join(sorted(VARIANTS))}, or several joined by '+'")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (0 = look it up)")
    parser.add_argument("--memory", action="store_true",
                        help=f"print the compiled memory table on {MEMORY_DEVICES} simulated CPU devices instead")
    parser.add_argument("--loop", action="store_true",
                        help="instead: the full training loop's images/s against the bare step's, same data "
                             "(benchmarks/loop_figure.py; target >= 0.97)")
    parser.add_argument("--memory-batches",
                        help="global batches of the memory table "
                             "(default 256,512,1024,2048,4096; 256,512 with --quick)")
    parser.add_argument("--memory-model", default="ViT-Tiny-8", help="model of the full-step memory column")
    parser.add_argument("--accumulate-steps", type=int, default=4,
                        help="micro-batches of the accumulated step in the --memory comparison (default 4)")
    _timing.add_common_arguments(parser, repeats=3)
    args = parser.parse_args(argv)
    args.model = args.model or ("ViT-Tiny-8" if args.quick else "ViT-B-16")
    args.batch = args.batch or (8 if args.quick else 256 if args.device == "gpu" else 16)
    args.dtype = args.dtype or ("bfloat16" if args.device == "gpu" else "float32")
    if args.quick:
        args.repeats = min(args.repeats, 2)
    if args.variant:
        try:
            variant_names(args.variant)
        except argparse.ArgumentTypeError as error:
            parser.error(f"--variant: {error}")
    args.memory_batches = args.memory_batches or ("256,512" if args.quick else "256,512,1024,2048,4096")
    try:
        args.memory_batches = [int(b) for b in args.memory_batches.split(",")]
    except ValueError:
        parser.error(f"--memory-batches {args.memory_batches!r} is not a comma-separated list of integers")
    if any(b <= 0 or b % MEMORY_DEVICES for b in args.memory_batches):
        parser.error(f"--memory-batches must be positive multiples of {MEMORY_DEVICES}")
    try:
        args.remat = remat_lib.check(args.remat, "--remat")
    except ValueError as error:
        parser.error(str(error))
    if args.batch < 1 or args.repeats < 1 or args.accumulate_steps < 1:
        parser.error("--batch, --repeats and --accumulate-steps must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax  # noqa: PLC0415 - configured before its backend starts

    if args.memory or args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    else:  # JAX would take 75% of the GPU up front; leave the reference room of its own
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    if args.memory:
        jax.config.update("jax_num_cpu_devices", MEMORY_DEVICES)
    threads = _timing.pin_threads(args.threads, torch_too=not args.memory)
    _timing.warn_if_busy(threads)
    machine = _timing.machine_info(threads)
    if args.loop:
        from loop_figure import loop_figure  # noqa: PLC0415 - benchmarks/ is on sys.path when run as a script

        row = loop_figure(model=args.model, batch=args.batch, window=5, windows=4, rounds=args.repeats)
        _timing.print_rows([row])
        result = {"loop_vs_bare_step": row}
    else:
        result = measure_memory(args) if args.memory else measure_speed(args)
    kind = "train_step_loop" if args.loop else "train_step_memory" if args.memory else "train_step"
    _timing.write_json(args.out, {"benchmark": kind,
                                  "args": vars(args), "machine": machine,
                                  "load_average_after": os.getloadavg(), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
