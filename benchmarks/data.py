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

Each timed call pulls `--batches` batches from one loader. Before every call the
process tree is left to settle (so the other loader's workers, refilling their
prefetch buffers, never run during a measurement) and then the batches this loader
could have prefetched are taken untimed (`--drain`; so the call measures its steady
production rate, not a full buffer). CPU seconds of the whole process tree are counted too: images
per CPU-second is the per-core efficiency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import _timing

TARGET = 1.3


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


def ours_loader(shards: list[str], batch: int, workers: int, text_type: str, image_size: int, seed: int = 0):
    from bioclip_jax.data.pipeline import make_train_dataset  # noqa: PLC0415

    dataset = make_train_dataset(shards, global_batch_size=batch, seed=seed, text_type=text_type,
                                 tokenizer="ViT-B-16", image_size=image_size, worker_count=workers)
    return iter(dataset)


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


def tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (loader workers)."""
    import psutil  # noqa: PLC0415

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
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


def measure_loaders(args, shards: list[str]) -> dict:
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
        # The kernel counts CPU time in clock ticks (10 ms): a call served from a full buffer can read 0.
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
    return row


def measure_feed(args, shards: list[str]) -> dict:
    """Train steps fed by our loader vs on one cached batch: a ratio near 1 means no stall."""
    import jax  # noqa: PLC0415

    import bioclip_jax  # noqa: PLC0415
    from train_step import jax_trainer, model_params  # noqa: PLC0415

    model = bioclip_jax.create_model(args.feed_model, None)
    size = model.config.vision.image_size
    train = jax_trainer(model_params(model), args.feed_model, args.batch, "float32", False, jax.devices("cpu")[:1])
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
                             "(default 8 per worker + 4; Grain holds about 6 per worker, torch 2)")
    parser.add_argument("--text-type", default="taxon_com", help="caption type both sides tokenise")
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
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
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
        result = {"loader": measure_loaders(args, shards)}
        if args.feed:
            result["feed"] = measure_feed(args, shards)
    _timing.write_json(args.out, {"benchmark": "data", "args": vars(args), "target_ratio": TARGET,
                                  "machine": machine, "load_average_after": os.getloadavg(), **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
