"""What the training loop costs around its step, and what the compilation cache saves on a restart.

    python benchmarks/loop_figure.py              # loop vs bare step, ViT-Tiny-8 on a synthetic tree of life
    python benchmarks/loop_figure.py --restart    # also: a start with an empty vs a filled compilation cache
    python benchmarks/loop_figure.py --model ViT-B-16 --image-size 224 --batch 512 \
        --set dtype=bfloat16 --set data.workers=15      # an accelerator's figure (benchmarks/gpu_check.sh)

Loop: `bioclip_jax.train.loop.train` itself (Grain data, device prefetch, skip budget,
metrics one step late, checkpoint manager), its images/s read from its own
metrics.jsonl windows (the first window, which compiles, is left out). Bare step: the
same jitted step, built as the loop builds it, on the same batches already on the
devices, timed over windows of the same length. Rounds alternate loop and bare step;
the figure is loop images/s / bare-step images/s (best and median), target >= 0.97.

--restart runs `python -m bioclip_jax.train ... --stop_after=2` in fresh processes, each
round once with an empty and once with the filled compilation cache (new workdirs both
times), and prints the seconds saved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import _timing

from bioclip_jax.config_fields import OVERRIDE_PREFIX, apply_overrides, read_config_file

TARGET = 0.97
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _config(shards: str, model: str, batch: int, steps: int, window: int, cache_dir: str, fields: dict | None = None):
    _, config = read_config_file(os.path.join(REPO, "configs", "synthetic_tiny.py"), "synthetic_tiny")
    config.data.train_shards, config.model.name, config.data.batch_size = shards, model, batch
    config.total_steps, config.log_every_steps = steps, window
    config.checkpoint.every_steps, config.eval.every_steps = 10 * steps, 0
    config.schedule.warmup_steps = 1
    config.compilation_cache_dir = cache_dir  # later rounds load the step instead of compiling it
    return apply_overrides(config, [f"{OVERRIDE_PREFIX}{name}={text}" for name, text in (fields or {}).items()])


def _loop_windows(config, workdir: str) -> list[float]:
    """Seconds per logging window of a whole training run, from its metrics (compile window dropped)."""
    from bioclip_jax.train.loop import train  # noqa: PLC0415
    from bioclip_jax.train.metrics import read_metrics  # noqa: PLC0415

    train(config, workdir)
    windows = [r["seconds_per_step"] * config.log_every_steps for r in read_metrics(workdir) if "loss" in r]
    return windows[1:]


def _bare_windows(config, windows: int) -> list[float]:
    """Seconds per window of the loop's own step on the loop's own batches, placed on the devices beforehand."""
    import jax  # noqa: PLC0415

    from bioclip_jax.parallel.mesh import make_mesh  # noqa: PLC0415
    from bioclip_jax.train import loop  # noqa: PLC0415
    from bioclip_jax.train import state as state_lib  # noqa: PLC0415
    from bioclip_jax.train.optimizer import make_schedule  # noqa: PLC0415

    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    skeleton = state_lib.model_skeleton(config)
    layout = state_lib.state_layout(config, skeleton, mesh)
    arch = state_lib.train_architecture(config)
    params, preprocess = loop.initial_params(config)
    state = state_lib.initial_state(layout, params)
    schedule = make_schedule(config, state_lib.optimizer_updates(config))
    step = loop.make_train_step(config, skeleton, layout, mesh, schedule, preprocess.mean, preprocess.std)
    data = iter(loop.train_dataset(config, arch))
    batches = [loop.to_devices(next(data), mesh) for _ in range(config.log_every_steps)]
    state, metrics = step(state, batches[0])  # compile (or load) outside the windows
    jax.block_until_ready(metrics)
    seconds = []
    for _ in range(windows):
        start = time.perf_counter()
        for batch in batches:
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        seconds.append(time.perf_counter() - start)
    return seconds


def loop_figure(model: str = "ViT-Tiny-8", batch: int = 128, window: int = 5, windows: int = 4, rounds: int = 3,
                shards: str | None = None, fields: dict | None = None, image_size: int = 64) -> dict:
    """Loop and bare-step images/s on the same data; returns the result row (ratio = loop / bare).

    `fields`: config overrides by dotted name, as typed after --config. ({"data.workers": "15"})."""
    with tempfile.TemporaryDirectory(prefix="loop_figure_") as scratch:
        shards = shards or _synthetic_shards(scratch, image_size)
        config = _config(shards, model, batch, steps=window * (windows + 1), window=window,
                         cache_dir=os.path.join(scratch, "xla"), fields=fields)
        loop_s, bare_s = [], []
        for index in range(rounds):
            loop_s += _loop_windows(config, os.path.join(scratch, f"run{index}"))
            bare_s += _bare_windows(config, windows)
    items = batch * window
    row = _timing.compare(f"{model} batch {batch}: loop vs bare step", _timing.Samples(loop_s, items),
                          _timing.Samples(bare_s, items), unit="images/s", sides=("loop", "bare_step"))
    print(f"{row['label']} (windows of {window} steps, {len(loop_s)} per side)")
    for side in row["sides"]:
        print(f"  {side:>9}: best {row[side]['items_per_s_best']:8.1f} images/s, "
              f"median {row[side]['items_per_s_median']:8.1f}")
    print(f"  loop / bare step: best {row['ratio_of_mins']:.3f}, median {row['ratio_of_medians']:.3f} "
          f"(target >= {TARGET})")
    return row


def restart_figure(rounds: int = 3, shards: str | None = None) -> dict:
    """Seconds of `bioclip_jax.train --stop_after=2` in a fresh process: empty vs filled compilation cache."""
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="restart_figure_") as scratch:
        shards = shards or _synthetic_shards(scratch)
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
        for index in range(rounds):
            cache = os.path.join(scratch, f"xla{index}")
            for name, times in (("cold", cold), ("warm", warm)):
                command = [sys.executable, "-m", "bioclip_jax.train", "--config=configs/synthetic_tiny.py",
                           f"--workdir={os.path.join(scratch, f'{name}{index}')}", "--stop_after=2",
                           f"--config.data.train_shards={shards}", f"--config.compilation_cache_dir={cache}"]
                start = time.perf_counter()
                result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
                times.append(time.perf_counter() - start)
                if result.returncode not in (0, 75):
                    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    saved = [c - w for c, w in zip(cold, warm)]
    print(f"start to step 2 (ViT-Tiny-8, synthetic_tiny), {rounds} rounds, fresh process each time:")
    print(f"  empty cache  : min {min(cold):6.1f} s, median {statistics.median(cold):6.1f} s")
    print(f"  filled cache : min {min(warm):6.1f} s, median {statistics.median(warm):6.1f} s")
    print(f"  saved        : min {min(saved):6.1f} s, median {statistics.median(saved):6.1f} s "
          f"(cold / warm: median {statistics.median(cold) / statistics.median(warm):.2f}x)")
    return {"cold_s": cold, "warm_s": warm, "saved_s": saved}


def _synthetic_shards(scratch: str, image_size: int = 64) -> str:
    from bioclip_jax.synthetic.dataset import make_synthetic  # noqa: PLC0415

    root = os.path.join(scratch, "synthetic")
    make_synthetic(root, species=40, images_per_species=20, held_out_species=0.1, seed=0, image_size=image_size)
    return os.path.join(root, "train")


def _field(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=VALUE")
    return name, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-Tiny-8")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--window", type=int, default=5, help="steps per timed window (= log_every_steps)")
    parser.add_argument("--windows", type=int, default=4, help="timed windows per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--shards", default=None, help="training shards (default: a generated synthetic set)")
    parser.add_argument("--restart", action="store_true", help="also time a start with an empty vs a filled cache")
    parser.add_argument("--image-size", type=int, default=64, help="pixels of the generated synthetic images")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", type=_field,
                        help="config override, e.g. dtype=bfloat16 or data.workers=15 (repeatable)")
    parser.add_argument("--out", help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    machine = _timing.machine_info()
    print(f"{machine['cpu']}, {machine['logical_cores']} logical cores, load {machine['load_average'][0]:.2f}",
          flush=True)
    _timing.warn_if_busy(len(os.sched_getaffinity(0)))
    payload = {"machine": machine, "loop": loop_figure(args.model, args.batch, args.window, args.windows,
                                                       args.rounds, args.shards, dict(args.set), args.image_size)}
    if args.restart:
        payload["restart"] = restart_figure(args.rounds, args.shards)
    _timing.write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
