"""One framework's contrastive train step on one accelerator, alone in its process, at the largest batch it fits.

    python benchmarks/gpu_step.py ours --model ViT-B-16 --settings cudnn:none,cudnn:minimal,xla:full --out ours.json
    python benchmarks/gpu_step.py open_clip --model ViT-B-16 --settings plain:512,checkpointing:1024 --out ref.json

benchmarks/gpu_check.sh runs each side in its own process, so neither framework's allocator
takes memory from the other. Each setting is timed on its own: warm-up steps (compilation),
then three windows of --steps steps queued back to back (`time_windows`); images/s best and median,
and MFU (model FLOPs only, `bioclip_jax.train.step.model_flops_per_pair`; recomputation is not counted) against the
device's peak.

ours: a setting is ATTENTION:REMAT (auto, xla or cudnn; none, minimal, full, save:..., or a
jax.checkpoint_policies name), optionally :BATCH, optionally @unrolled (the blocks as a Python
loop instead of lax.scan, whose backward pass zero-fills the stacks it saves). Without a batch it takes
the largest batch that fits: the activations the gradient keeps per pair (`saved_bytes_per_pair`, read from the
traced program) against the device's memory, rounded down to a multiple of 64, at most
--max-batch; a batch that still runs out of memory is retried at 3/4 of it. ours writes its
initial weights as an open_clip folder (--weights), which the open_clip side loads, so both
start from the same model; both draw the same batch from the same seed.

open_clip: a setting is plain:BATCH or checkpointing:BATCH (open_clip's grad checkpointing),
open_clip_train's step with AMP bf16 (`train_step.torch_runner`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import numpy as np

import _timing
from bioclip_jax import paths

OUT_OF_MEMORY = ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemoryError", "Out of memory")
BATCH_MULTIPLE = 64


def _is_out_of_memory(error: BaseException) -> bool:
    return any(marker in f"{type(error).__name__}: {error}" for marker in OUT_OF_MEMORY)


def train_batch(image_size: int, batch: int, seed: int = 0):
    """The same images and tokens in both processes: uint8 pixels and valid token rows."""
    from train_step import train_inputs  # noqa: PLC0415

    images, tokens = train_inputs(image_size, batch, seed)
    return images, tokens.astype(np.int32)


def time_windows(step, finish, warmup: int, steps: int, windows: int = 3) -> dict:
    """Seconds per step over `windows` windows of `steps` steps each, queued back to back.

    `step()` queues one step without waiting for it; `finish()` waits for every queued step and
    returns the losses since the last call. The host is never the bottleneck it would be if
    every step were waited for (each framework's own training loop does not wait either).
    """
    for _ in range(warmup):
        step()
    losses = finish()
    seconds = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        losses += finish()
        seconds.append((time.perf_counter() - start) / steps)
    return {"seconds": seconds, "losses": losses, "min_s": min(seconds), "median_s": float(np.median(seconds))}


def _rates(record: dict, batch: int, flops_per_pair: float, peak_tflops: float) -> dict:
    best, median = batch / record["min_s"], batch / record["median_s"]
    mfu = (flops_per_pair * best / 1e12 / peak_tflops) if math.isfinite(peak_tflops) else None
    return dict(record, batch=batch, images_per_s_best=best, images_per_s_median=median, mfu_best=mfu)


# ----------------------------------------------------------------------------- ours


def largest_batch(arch, kernel: str, remat: str, limit_bytes: int, state_bytes: int,
                  max_batch: int) -> tuple[int, float]:
    """(batch, bytes kept per pair): the batch whose kept activations, with room for one block's temporaries,
    fill the memory the train state leaves."""
    import jax.numpy as jnp  # noqa: PLC0415

    from bioclip_jax.models.saved_activations import saved_bytes_per_pair  # noqa: PLC0415

    per_pair = sum(saved_bytes_per_pair(arch, tower, dtype=jnp.bfloat16, remat=remat, attention=kernel)
                   for tower in ("image", "text"))
    block = max(per_pair / max(arch.vision.layers, 1), 2 ** 20) * 4  # one block's backward temporaries
    images = arch.vision.image_size ** 2 * 3 * 6  # uint8 input, its float copy on the device
    usable = 0.85 * limit_bytes - state_bytes
    batch = int(usable / (per_pair + block + images)) // BATCH_MULTIPLE * BATCH_MULTIPLE
    return max(BATCH_MULTIPLE, min(batch, max_batch)), per_pair


def run_ours(args) -> dict:
    import jax  # noqa: PLC0415

    import bioclip_jax  # noqa: PLC0415
    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415
    from bioclip_jax.train.step import device_peak_tflops, model_flops_per_pair  # noqa: PLC0415
    from train_step import jax_trainer, model_params  # noqa: PLC0415

    device = jax.devices()[0]
    arch = get_model_config(args.model)
    model = bioclip_jax.create_model(args.model, None, seed=0)
    if args.weights:
        bioclip_jax.export_open_clip(model, args.weights)
    params = model_params(model)
    del model
    n_params = sum(v.size for v in params.values())
    stats = device.memory_stats() or {}
    limit = int(stats.get("bytes_limit", 0)) or int(args.memory_gib * 2 ** 30)
    peak = device_peak_tflops(args.peak_tflops)
    flops = model_flops_per_pair(arch)
    results = {"side": "bioclip_jax", "model": args.model, "device_kind": device.device_kind,
               "memory_limit_bytes": limit, "peak_tflops": peak if math.isfinite(peak) else None,
               "flops_per_pair": flops, "machine": _timing.machine_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "settings": []}
    deadline = time.monotonic() + args.budget_s
    for setting in args.settings:
        fields, _, layers = setting.partition("@")
        kernel, remat, *fixed = fields.split(":")
        scan_layers = layers != "unrolled"
        entry = {"setting": setting, "attention": kernel, "remat": remat, "scan_layers": scan_layers}
        results["settings"].append(entry)
        if time.monotonic() > deadline:
            entry["error"] = f"skipped: the {args.budget_s} s budget was spent"
            continue
        try:
            if fixed:
                batch = int(fixed[0])
            else:
                batch, entry["saved_bytes_per_pair"] = largest_batch(arch, kernel, remat, limit, 16 * n_params,
                                                                     args.max_batch)
            for attempt in range(3):
                try:
                    started = time.monotonic()
                    train = jax_trainer(params, args.model, batch, "bfloat16", remat, [device], kernel, scan_layers)
                    images, tokens = train_batch(arch.vision.image_size, batch)
                    placed = train.place({"image": images, "tokens": tokens})
                    queued = []

                    def finish(queued=queued):
                        losses = [float(loss) for loss in queued]
                        queued.clear()
                        return losses

                    record = time_windows(lambda: queued.append(train(placed, wait=False)), finish,
                                          args.warmup, args.steps)
                    entry.update(_rates(record, batch, flops, peak), first_step_s=time.monotonic() - started)
                    break
                except Exception as error:  # out of memory: a smaller batch
                    if not _is_out_of_memory(error) or attempt == 2:
                        raise
                    entry.setdefault("out_of_memory_at", []).append(batch)
                    batch = max(BATCH_MULTIPLE, batch * 3 // 4 // BATCH_MULTIPLE * BATCH_MULTIPLE)
                finally:
                    train = placed = None  # free the state before the next attempt
            print(_line(entry), flush=True)
        except Exception as error:  # noqa: BLE001 - one setting's failure never costs the others
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
            traceback.print_exc()
            print(f"{setting}: FAILED {entry['error']}", flush=True)
        save(results, args.out)
    return results


# ----------------------------------------------------------------------------- open_clip


def run_open_clip(args) -> dict:
    import open_clip  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from bioclip_jax.models.config import get_model_config  # noqa: PLC0415
    from bioclip_jax.train.step import model_flops_per_pair, peak_tflops_of  # noqa: PLC0415
    from train_step import torch_runner  # noqa: PLC0415

    torch.backends.cuda.matmul.allow_tf32 = True  # as open_clip_train sets on CUDA
    torch.backends.cudnn.benchmark = True
    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: gpu_check.sh's quick path
    arch = get_model_config(args.model)
    kind = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = args.peak_tflops or peak_tflops_of(kind)
    flops = model_flops_per_pair(arch)
    results = {"side": "open_clip", "model": args.model, "device_kind": kind,
               "peak_tflops": peak if math.isfinite(peak) else None, "flops_per_pair": flops,
               "machine": _timing.machine_info(), "settings": []}
    deadline = time.monotonic() + args.budget_s
    for setting in args.settings:
        how, batch = setting.split(":")
        batch = int(batch)
        entry = {"setting": setting, "grad_checkpointing": how == "checkpointing"}
        results["settings"].append(entry)
        if time.monotonic() > deadline:
            entry["error"] = f"skipped: the {args.budget_s} s budget was spent"
            continue
        try:
            model = open_clip.create_model_and_transforms(f"local-dir:{args.weights}")[0]
            model.set_grad_checkpointing(how == "checkpointing")
            images, tokens = train_batch(arch.vision.image_size, batch)
            run, holder = torch_runner(model, images, tokens, True, device, wait=False)

            def finish(holder=holder):
                if device == "cuda":
                    torch.cuda.synchronize()
                losses = [float(loss) for loss in holder.pop("losses", [])]
                return losses

            record = time_windows(run, finish, args.warmup, args.steps)
            entry.update(_rates(record, batch, flops, peak))
            print(_line(entry), flush=True)
        except Exception as error:  # noqa: BLE001
            entry["error"] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:500]
            print(f"{setting}: FAILED {entry['error']}", flush=True)
        finally:
            model = run = holder = None
            torch.cuda.empty_cache()
        save(results, args.out)
    return results


def save(results: dict, path: str) -> None:
    """The record so far, rewritten after every setting: a run cut short by its time limit keeps what it measured."""
    paths.write_atomically(path, json.dumps(results, indent=1))


def _line(entry: dict) -> str:
    mfu = "n/a" if entry.get("mfu_best") is None else f"{entry['mfu_best']:.1%}"
    return (f"{entry['setting']}: batch {entry['batch']}, {entry['images_per_s_best']:.0f} / "
            f"{entry['images_per_s_median']:.0f} images/s (best / median), MFU {mfu}, "
            f"first loss {entry['losses'][0]:.5f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=("ours", "open_clip"))
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--settings", required=True, type=lambda s: [p for p in s.split(",") if p])
    parser.add_argument("--weights",
                        help="open_clip folder: ours writes its initial weights there, open_clip reads them")
    parser.add_argument("--max-batch", type=int, default=2048)
    parser.add_argument("--memory-gib", type=float, default=16.0, help="device memory when the device does not say")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no setting after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    results = run_ours(args) if args.side == "ours" else run_open_clip(args)
    save(results, args.out)
    return 0 if any("images_per_s_best" in entry for entry in results["settings"]) else 1


if __name__ == "__main__":
    sys.exit(main())
