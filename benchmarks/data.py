"""Training-loader images/s: bioclip_jax's Grain pipeline vs open_clip_train's webdataset pipeline.

    python benchmarks/data.py                          # synthetic 224 px shards, batch 32, 2 workers each
    python benchmarks/data.py --quick                  # < 1 minute
    python benchmarks/data.py --shards '/data/shard-{000000..000003}.tar' --workers 4
    python benchmarks/data.py --feed                   # also: do 2 workers keep a ViT-B-16 train step fed?

Both loaders read the same tar shards (page-cached after the first pass), decode
the JPEG, take a RandomResizedCrop(224, scale=(0.9, 1.0), bicubic), tokenise one
caption type, and batch. The reference is open_clip_train's `get_wds_dataset`
training pipeline stage by stage (detshuffle2 over shards, split by node/worker,
tarfile_to_samples_nothrow, shuffle(5000, initial 1000), decode("pilrgb"), its
train transform, per-sample tokeniser, batched, WebLoader), with the caption key
`<text_type>.txt` in place of `txt`, as the BioCLIP fork selects it. Differences
kept on purpose: ours emits uint8 HWC (normalised later on the device), the
reference float32 CHW normalised (its data contract).

Beside the reference, two figures of ours alone (`--no-extra` skips them):
- cores: images/s with the worker processes pinned to 2 cores vs to 1 (2 vs 1 workers), and
  the scaling between them (target >= 1.8x), with the cores each side actually got (CPU
  seconds / wall seconds: on a shared machine a side given 2 cores may get fewer);
- read latency: images/s over a source that waits `--read-latency-ms` (default 5) before
  every sample read, as a network filesystem does, vs no wait (target >= 0.8 kept).
Images per CPU-second, ours vs the reference (target >= 1.3x), come with the first table.

Each timed call pulls `--batches` batches from one loader. Before every call the
process tree is left to settle (so the other loader's workers, refilling their
prefetch buffers, never run during a measurement) and then the batches this loader
could have prefetched are taken untimed (`--drain`; so the call measures its steady
production rate, not a full buffer). CPU seconds of the whole process tree are counted too: images
per CPU-second is the per-core efficiency. They are read from the scheduler's nanosecond
counters (/proc/PID/task/TID/schedstat) where Linux has them, else in clock ticks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _timing

TARGET = 1.3
SCALING_TARGET = 1.8
LATENCY_TARGET = 0.8


# ----------------------------------------------------------------------------- shards


def synthetic_shards(directory: str, samples: int, shards: int, image_size: int) -> list[str]:
    """`samples` training images in `shards` tar shards of the synthetic tree of life."""
    from bioclip_jax.data.synthetic import make_synthetic  # noqa: PLC0415

    per_shard = -(-samples // shards)
    species = max(4, samples // 8)
    summary = make_synthetic(directory, species=species, images_per_species=-(-samples // species),
                             held_out_species=0, val_fraction=0.0, image_size=image_size,
                             samples_per_shard=per_shard, workers=min(4, os.cpu_count() or 1))
    return [os.path.join(directory, path) for path in summary.train_shards]


def expand(pattern: str) -> list[str]:
    from bioclip_jax.data.shard_index import expand_shard_pattern  # noqa: PLC0415

    paths = expand_shard_pattern(pattern)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"--shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return paths


# ----------------------------------------------------------------------------- loaders


class SlowReads:
    """A sample source whose every read first waits `seconds`: a network filesystem's per-sample latency."""

    def __init__(self, source, seconds: float):
        self.source, self.seconds = source, seconds

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        time.sleep(self.seconds)
        return self.source[index]


def ours_loader(shards: list[str], batch: int, workers: int, text_type: str, image_size: int, seed: int = 0,
                read_latency: float = 0.0):
    from bioclip_jax.data.pipeline import make_train_dataset  # noqa: PLC0415
    from bioclip_jax.data.tar_source import TarShardSource  # noqa: PLC0415

    source = SlowReads(TarShardSource(shards), read_latency) if read_latency else shards
    dataset = make_train_dataset(source, global_batch_size=batch, seed=seed, text_type=text_type,
                                 tokenizer="ViT-B-16", image_size=image_size, worker_count=workers)
    return iter(dataset)


def pinned_loader(args, shards: list[str], cores: list[int]):
    """Our loader with one worker process per core of `cores`, every thread of each pinned to those cores.

    Affinity is per thread on Linux: the threads a worker has already started keep
    their mask unless each is pinned (threads started later inherit it).
    """
    import psutil  # noqa: PLC0415

    me = psutil.Process()
    before = {proc.pid for proc in me.children(recursive=True)}
    loader = ours_loader(shards, args.batch, len(cores), args.text_type, args.image_size)
    next(loader)  # starts the workers
    for proc in me.children(recursive=True):
        if proc.pid not in before:
            for thread in os.listdir(f"/proc/{proc.pid}/task"):
                try:
                    os.sched_setaffinity(int(thread), cores)
                except OSError:
                    pass  # the thread ended meanwhile
    return loader


def open_clip_train_loader(shards: list[str], batch: int, workers: int, text_type: str, image_size: int,
                           seed: int = 0):
    """open_clip_train.data.get_wds_dataset(is_train=True), with the caption read from `<text_type>.txt`."""
    import open_clip  # noqa: PLC0415
    import webdataset as wds  # noqa: PLC0415
    from open_clip_train import data as oc_data  # noqa: PLC0415

    if workers > len(shards):
        raise SystemExit(f"open_clip_train needs at least as many shards ({len(shards)}) as workers ({workers})")
    caption = f"{text_type}.txt"
    preprocess = open_clip.image_transform(image_size, is_train=True, aug_cfg={"scale": (0.9, 1.0)})
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        oc_data.detshuffle2(bufsize=oc_data._SHARD_SHUFFLE_SIZE, initial=oc_data._SHARD_SHUFFLE_INITIAL,
                            seed=seed, epoch=oc_data.SharedEpoch(0)),
        wds.split_by_node,
        wds.split_by_worker,
        oc_data.tarfile_to_samples_nothrow,
        wds.shuffle(bufsize=oc_data._SAMPLE_SHUFFLE_SIZE, initial=oc_data._SAMPLE_SHUFFLE_INITIAL),
        wds.select(lambda sample: caption in sample and any(k in sample for k in ("jpg", "png", "jpeg", "webp"))),
        wds.decode("pilrgb", handler=oc_data.log_and_continue),
        wds.rename(image="jpg;png;jpeg;webp", text=caption),
        wds.map_dict(image=preprocess, text=lambda text: tokenizer(text)[0]),
        wds.to_tuple("image", "text"),
        wds.batched(batch, partial=False),
    ).with_epoch(sys.maxsize)  # get_wds_dataset sets the batches per worker epoch; we never end one
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=workers,
                           persistent_workers=workers > 0)
    return iter(loader)


# ----------------------------------------------------------------------------- measuring


def _schedstat_seconds(pid: int) -> float:
    """CPU seconds of the live threads of one process, from the scheduler's nanosecond counters."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # the thread ended meanwhile
    return total / 1e9


CPU_CLOCK = "schedstat" if os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/schedstat") else "ticks"


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live children (loader workers)."""
    import psutil  # noqa: PLC0415

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            if CPU_CLOCK == "schedstat":
                total += _schedstat_seconds(proc.pid)
            else:
                times = proc.cpu_times()
                total += times.user + times.system
        except (psutil.Error, OSError):
            pass
    return total


def settle(max_seconds: float = 20.0, window: float = 0.25, idle_share: float = 0.05) -> None:
    """Waits until the process tree uses < `idle_share` of a core (prefetch buffers are full)."""
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        before = tree_cpu_seconds()
        time.sleep(window)
        if tree_cpu_seconds() - before < idle_share * window:
            return


def drain(iterator, batches: int) -> None:
    """Takes `batches` batches untimed: more than a loader can hold prefetched, so the timed
    batches that follow come at its steady production rate, not from a full buffer."""
    for _ in range(batches):
        next(iterator)


def pull(iterator, batches: int, cpu: list[float]):
    """A timed-call body: `batches` batches from `iterator`; CPU seconds used go to `cpu`."""
    def run():
        start = tree_cpu_seconds()
        for _ in range(batches):
            next(iterator)
        cpu.append(tree_cpu_seconds() - start)
    return run


def measure_loaders(args, shards: list[str]) -> tuple[dict, dict]:
    """Ours vs the reference: the compare() row with images per CPU-second, and the live loaders."""
    images = args.batch * args.batches
    loaders = {_timing.OURS: ours_loader(shards, args.batch, args.workers, args.text_type, args.image_size),
               _timing.REFERENCE: open_clip_train_loader(shards, args.batch, args.workers, args.text_type,
                                                         args.image_size)}
    cpu = {name: [] for name in loaders}
    row = _timing.side_by_side(f"loader, {args.workers} workers (B={args.batch})",
                               pull(loaders[_timing.OURS], args.batches, cpu[_timing.OURS]),
                               pull(loaders[_timing.REFERENCE], args.batches, cpu[_timing.REFERENCE]),
                               images, args.repeats, args.warmup, unit="images/s",
                               before_each=lambda name: (settle(), drain(loaders[name], args.drain)))
    timed = {name: cpu[name][-args.repeats:] for name in cpu}
    for name in loaders:
        row[name]["cpu_seconds"] = timed[name]
        # In clock ticks (10 ms, where schedstat is missing) a call served from a full buffer can read 0.
        row[name]["images_per_cpu_second"] = images * len(timed[name]) / sum(timed[name]) if sum(timed[name]) else None
    _timing.print_rows([row], TARGET)
    ours, reference = (row[name]["images_per_cpu_second"] for name in (_timing.OURS, _timing.REFERENCE))
    if ours is None or reference is None:
        row["per_cpu_second_ratio"] = None
        print("images per CPU-second: not measurable, the timed calls used less CPU than the clock resolution; "
              "raise --batches or --drain")
    else:
        row["per_cpu_second_ratio"] = ours / reference
        print(f"images per CPU-second (per core): ours {ours:.1f}, open_clip_train {reference:.1f}, "
              f"ratio {ours / reference:.2f}x (target {TARGET}x)")
    return row, loaders


def ours_alone(label: str, first, second, sides: tuple[str, str], args, target: float, meaning: str) -> dict:
    """Two of our loaders side by side (first's speed / second's is the row's ratio).

    Each side also reports the cores its process tree got (CPU seconds / wall seconds of
    the timed calls): on a shared machine a side given 2 cores may get fewer.
    """
    loaders = dict(zip(sides, (first, second)))
    cpu = {name: [] for name in sides}
    row = _timing.side_by_side(label, pull(first, args.batches, cpu[sides[0]]),
                               pull(second, args.batches, cpu[sides[1]]), args.batch * args.batches, args.repeats,
                               args.warmup, unit="images/s", sides=sides,
                               before_each=lambda name: (settle(), drain(loaders[name], args.drain)))
    _timing.print_rows([row])
    row["target"] = target
    for name in sides:
        timed = cpu[name][-args.repeats:]
        row[name]["cpu_seconds"] = timed
        row[name]["cores_used"] = sum(timed) / sum(row[name]["seconds"])
        row[name]["images_per_cpu_second"] = (args.batch * args.batches * len(timed) / sum(timed)
                                              if sum(timed) else None)
    print("cores used: " + ", ".join(f"{name} {row[name]['cores_used']:.2f}" for name in sides) +
          "; images per CPU-second: " + ", ".join(
              f"{name} {row[name]['images_per_cpu_second'] or 0:.1f}" for name in sides))
    print(f"{meaning}: {row['ratio_of_medians']:.2f}x by medians, {row['ratio_of_mins']:.2f}x by minima "
          f"(target >= {target}x){'' if row['ratio_of_medians'] >= target else ': below target'}")
    return row


def measure_cores(args, shards: list[str], cores: list[int]) -> dict | None:
    """Our loader with its workers pinned to 2 cores vs to 1: how it scales with cores."""
    if len(cores) < 2:
        print("\ncores: this process may use only 1 CPU, so there is no 2-core figure")
        return None
    print(f"\nour loader, workers pinned to CPUs {cores[:2]} (2 workers) vs CPU {cores[0]} (1 worker)")
    two, one = pinned_loader(args, shards, cores[:2]), pinned_loader(args, shards, cores[:1])
    return ours_alone(f"ours, 2 vs 1 cores (B={args.batch})", two, one, ("2 cores", "1 core"), args,
                      SCALING_TARGET, "scaling from 1 to 2 cores")


def measure_read_latency(args, shards: list[str], plain) -> dict:
    """Our loader over a source that waits before every read vs the same loader without the wait."""
    latency = args.read_latency_ms / 1000
    print(f"\nour loader, {args.workers} workers: {args.read_latency_ms:g} ms before every sample read vs none")
    slow = ours_loader(shards, args.batch, args.workers, args.text_type, args.image_size, read_latency=latency)
    return ours_alone(f"ours, {args.read_latency_ms:g} ms reads (B={args.batch})", slow, plain,
                      (f"{args.read_latency_ms:g} ms reads", "no latency"), args, LATENCY_TARGET,
                      "throughput kept with slow reads")


def measure_feed(args, shards: list[str]) -> dict:
    """Train steps fed by our loader vs on one cached batch: a ratio near 1 means no stall."""
    import jax  # noqa: PLC0415

    import bioclip_jax  # noqa: PLC0415
    from train_step import jax_trainer, model_params  # noqa: PLC0415

    model = bioclip_jax.create_model(args.feed_model, None)
    size = model.config.vision.image_size
    train = jax_trainer(model_params(model), args.feed_model, args.batch, "float32", "none", jax.devices("cpu")[:1])
    loader = ours_loader(shards, args.batch, args.workers, args.text_type, size)
    cached = next(loader)

    def fed():
        train(next(loader))

    row = _timing.side_by_side(f"{args.feed_model} step (B={args.batch})", fed, lambda: train(cached), args.batch,
                               args.feed_repeats, 1, unit="images/s", sides=("fed by loader", "cached batch"),
                               before_each=lambda name: settle())
    print(f"\n{args.feed_model} train step, batch {args.batch}: fed by our loader ({args.workers} workers) vs the "
          f"same step on a cached batch")
    _timing.print_rows([row])
    print(f"fed step time / cached step time: {1 / row['ratio_of_medians']:.3f} by medians, "
          f"{1 / row['ratio_of_mins']:.3f} by minima (1.00 = the step never waits for data)")
    return row


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="tar shard pattern (default: synthetic shards made in a temp dir)")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic images to make (default %(default)s)")
    parser.add_argument("--num-shards", type=int, default=4, help="synthetic shards to make (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="stored and cropped size (default %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader worker processes, each side (default %(default)s)")
    parser.add_argument("--batches", type=int, default=16, help="batches per timed call (default %(default)s)")
    parser.add_argument("--drain", type=int,
                        help="untimed batches before each timed call, to empty the prefetch buffers "
                             "(default 8 per worker + 4: more than either loader holds prefetched)")
    parser.add_argument("--text-type", default="taxon_com", help="caption type both sides tokenise")
    parser.add_argument("--read-latency-ms", type=float, default=5.0,
                        help="simulated wait before every sample read, for the latency figure (default %(default)s)")
    parser.add_argument("--no-extra", action="store_true", help="skip the cores and read-latency figures")
    parser.add_argument("--feed", action="store_true", help="also run train steps fed by our loader")
    parser.add_argument("--feed-model", help="model of --feed (default ViT-B-16; ViT-Tiny-8 with --quick)")
    parser.add_argument("--feed-repeats", type=int, default=3, help="timed rounds of --feed (default %(default)s)")
    _timing.add_common_arguments(parser, repeats=5)
    args = parser.parse_args(argv)
    if args.quick:
        args.samples, args.num_shards = min(args.samples, 128), min(args.num_shards, 2)
        args.batches, args.repeats, args.feed_repeats = min(args.batches, 4), min(args.repeats, 2), 2
        args.batch = min(args.batch, 16)
    args.drain = args.drain if args.drain is not None else 8 * max(1, args.workers) + 4
    args.feed_model = args.feed_model or ("ViT-Tiny-8" if args.quick else "ViT-B-16")
    if min(args.samples, args.num_shards, args.batch, args.batches, args.repeats, args.feed_repeats) < 1:
        parser.error("--samples, --num-shards, --batch, --batches and the repeats must be >= 1")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    if args.read_latency_ms <= 0:
        parser.error("--read-latency-ms must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))  # before --threads narrows this process
    threads = _timing.pin_threads(args.threads)
    _timing.warn_if_busy(threads)
    machine = _timing.machine_info(threads)
    with tempfile.TemporaryDirectory(prefix="bioclip_jax_data_bench_") as scratch:
        if args.shards:
            shards = expand(args.shards)
        else:
            start = time.perf_counter()
            shards = synthetic_shards(scratch, args.samples, args.num_shards, args.image_size)
            print(f"made {args.samples} synthetic {args.image_size} px images in {len(shards)} shards "
                  f"({time.perf_counter() - start:.0f} s)")
        print(f"{len(shards)} shards, batch {args.batch}, {args.workers} workers each, {args.batches} batches "
              f"per call, {args.repeats} interleaved rounds, {threads} cores")
        row, loaders = measure_loaders(args, shards)
        result = {"loader": row}
        if not args.no_extra:
            result["cores"] = measure_cores(args, shards, cores)
            result["read_latency"] = measure_read_latency(args, shards, loaders[_timing.OURS])
        if args.feed:
            result["feed"] = measure_feed(args, shards)
    _timing.write_json(args.out, {"benchmark": "data", "args": vars(args), "target_ratio": TARGET,
                                  "machine": machine, "cpu_clock": CPU_CLOCK, "load_average_after": os.getloadavg(),
                                  **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
