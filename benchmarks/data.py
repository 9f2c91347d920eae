"""Training-loader images/s: bioclip_jax's Grain pipeline vs open_clip_train's webdataset pipeline.

    python benchmarks/data.py                          # synthetic 224 px shards, batch 32, 2 workers each
    python benchmarks/data.py --quick                  # < 1 minute
    python benchmarks/data.py --shards '/data/shard-{000000..000003}.tar' --workers 4
    python benchmarks/data.py --feed                   # also: do 2 workers keep a ViT-B-16 train step fed?
    python benchmarks/data.py --scaling 1,4,15 --batch 256 --batches 48   # ours alone: images/s per worker count

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
counters (/proc/PID/task/TID/schedstat) where Linux has them, else in clock ticks. The main
process's share (all its threads: what joins chunks into batches) is reported apart from the
worker processes', in microseconds per image (target <= 50: 20,000 images/s on one core).

`--scaling 1,4,15` measures our loader alone (no reference, no torch) at each worker count:
the workers are started, 2 chunks per worker are taken untimed, then `--batches` batches
are timed while the main process pulls as fast as it can, so the figure is the steady rate
that the workers or the main process allow. Every timed batch is touched (a byte of each
page of its images read), as the host-to-device copy will. Each point stops taking batches after
`--point-limit-s` (the figure then covers the batches taken) and is abandoned, reported as
timed out, if one batch takes longer still. Every other timed call has a deadline too
(`--call-limit-s`): a loader that stops giving batches is reported, not waited for.

open_clip_train's webdataset pipeline never yields if one of its workers gets fewer
samples per epoch than one batch (`batched(partial=False)` drops them and `with_epoch`
starts the next epoch, forever), so the reference needs >= batch * workers samples in
>= workers shards; synthetic shards are sized for that.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import tempfile
import threading
import time

import _timing

TARGET = 1.3
SCALING_TARGET = 1.8
LATENCY_TARGET = 0.8
MAIN_PROCESS_US_TARGET = 50.0  # main-process CPU per image: 20,000 images/s on one core
SWEEP_TARGET = (15, 10.0)  # 15 workers should give >= 10x one worker (on >= 16 cores)
HARD_LIMIT_GRACE_S = 30.0  # past a point's soft limit, how long one batch may still take


# ----------------------------------------------------------------------------- shards


def synthetic_shards(directory: str, samples: int, shards: int, image_size: int) -> list[str]:
    """`samples` training images in `shards` tar shards of the synthetic tree of life."""
    from bioclip_jax.synthetic.dataset import make_synthetic  # noqa: PLC0415

    per_shard = -(-samples // shards)
    species = max(4, samples // 8)
    summary = make_synthetic(directory, species=species, images_per_species=-(-samples // species),
                             held_out_species=0, val_fraction=0.0, image_size=image_size,
                             samples_per_shard=per_shard, workers=max(1, min(16, len(os.sched_getaffinity(0)))))
    return [os.path.join(directory, path) for path in summary.train_shards]


def expand(pattern: str) -> list[str]:
    from bioclip_jax.data.shard_patterns import expand_shard_pattern  # noqa: PLC0415

    paths = expand_shard_pattern(pattern)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"--shards: {len(missing)} shard(s) not found, e.g. {missing[0]}")
    return paths


def samples_per_worker(shards: list[str], workers: int) -> int:
    """The fewest samples one of `workers` webdataset workers can get per epoch: each reads n // workers
    shards or more, of whichever order the shard shuffle gives (the smallest shards, at worst)."""
    from bioclip_jax.data.tar_source import TarShardSource  # noqa: PLC0415

    counts = sorted(len(index) for index in TarShardSource(shards).indexes)
    return sum(counts[:len(shards) // max(1, workers)])


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
    per_worker = samples_per_worker(shards, workers)
    if per_worker < batch:
        raise SystemExit(f"open_clip_train would never give a batch: one of its {max(1, workers)} workers reads "
                         f"{per_worker} samples per epoch, fewer than a batch of {batch}, and webdataset's "
                         f"with_epoch then loops over empty epochs forever; use more samples or fewer workers")
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
_PROC_CHILDREN = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _process_cpu_seconds(pid: int) -> float:
    try:
        if CPU_CLOCK == "schedstat":
            return _schedstat_seconds(pid)
        import psutil  # noqa: PLC0415

        times = psutil.Process(pid).cpu_times()
        return times.user + times.system
    except Exception:  # noqa: BLE001 - the process ended meanwhile
        return 0.0


def descendants(pid: int | None = None) -> list[int]:
    """Live child processes of `pid` (default: this one), recursively: the loaders' workers.

    Read from /proc (each thread's `children`, else every process's parent in `stat`), so the
    sweep needs no psutil; psutil only where there is no /proc.
    """
    pid = os.getpid() if pid is None else pid
    if not os.path.isdir("/proc/self/task"):
        import psutil  # noqa: PLC0415

        return [proc.pid for proc in psutil.Process(pid).children(recursive=True)]
    children_of = _children_by_task if _PROC_CHILDREN else _children_by_stat()
    found, todo = [], [pid]
    while todo:
        children = children_of(todo.pop())
        found += children
        todo += children
    return found


def _children_by_task(pid: int) -> list[int]:
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                children += [int(child) for child in f.read().split()]
        except OSError:
            pass  # the thread ended meanwhile
    return children


def _children_by_stat():
    """pid -> its children, from every process's parent (field 4 of /proc/PID/stat, after the name)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(parent, []).append(int(entry))
    return lambda pid: parents.get(pid, [])


def main_cpu_seconds() -> float:
    """CPU seconds of this process, all its threads (the training loop's side of a loader)."""
    return _process_cpu_seconds(os.getpid())


def workers_cpu_seconds() -> float:
    """CPU seconds of this process's live descendants (the loaders' worker processes)."""
    return sum(_process_cpu_seconds(pid) for pid in descendants())


def tree_cpu_seconds() -> float:
    """CPU seconds of this process and its live children (loader workers)."""
    return main_cpu_seconds() + workers_cpu_seconds()


def settle(max_seconds: float = 10.0, window: float = 0.25, idle_share: float = 0.05) -> bool:
    """Waits until the process tree uses < `idle_share` of a core (prefetch buffers are full).

    The CPU this thread spends reading the counters is left out: with many workers (hundreds
    of threads to read) it alone exceeded the idle share, and every settle waited its maximum.
    """
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:
        own, before = time.thread_time(), tree_cpu_seconds()
        time.sleep(window)
        used = tree_cpu_seconds() - before - (time.thread_time() - own)
        if used < idle_share * window:
            return True
    return False


class TimedOut(Exception):
    """A loader gave no batch (or not all of them) within the time allowed."""


@contextlib.contextmanager
def deadline(seconds: float | None, what: str):
    """Raises TimedOut in the main thread once the block has run `seconds` (SIGALRM): a next() that waits
    on a queue is interrupted at its next poll. No limit off the main thread or without setitimer."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise TimedOut(f"{what}: nothing after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def close_loader(iterator) -> None:
    """Stops a loader's workers now: ours closes, a torch DataLoader iterator shuts its workers down."""
    for method in ("close", "_shutdown_workers"):
        if hasattr(iterator, method):
            try:
                getattr(iterator, method)()
            except Exception as error:  # noqa: BLE001 - a loader that timed out may be half-stopped
                print(f"note: closing a loader failed: {error!r}")
            return


def drain(iterator, batches: int) -> None:
    """Takes `batches` batches untimed: more than a loader can hold prefetched, so the timed
    batches that follow come at its steady production rate, not from a full buffer."""
    for _ in range(batches):
        next(iterator)


def touch(batch) -> None:
    """Reads a byte of every page of the batch's images, as the host-to-device copy will. Both loaders
    hand over images in shared memory that the main process has not yet mapped: mapping them is the
    training loop's cost, so the timed calls pay it (a batch the main process joined itself was
    already mapped)."""
    import numpy as np  # noqa: PLC0415

    images = np.asarray(batch["image"] if isinstance(batch, dict) else batch[0])
    images.reshape(-1).view(np.uint8)[::4096].max()


def pull(iterator, batches: int, cpu: list[tuple[float, float]], limit_s: float | None = None, name: str = ""):
    """A timed-call body: `batches` batches from `iterator` within `limit_s`, each touched; the CPU seconds
    used by the main process and by the workers go to `cpu`. Each counter is read next to the batches,
    the other outside them, so reading the workers' counters is not charged to the main process."""
    def run():
        with deadline(limit_s, f"{name}: {batches} batches"):
            workers, main = workers_cpu_seconds(), main_cpu_seconds()
            for _ in range(batches):
                touch(next(iterator))
            main_end = main_cpu_seconds()
            cpu.append((main_end - main, workers_cpu_seconds() - workers))
    return run


def prepare(name: str, iterator, args, workers: int) -> None:
    """The untimed step before a timed call: settle, then drain, within the call's deadline."""
    batches = drain_batches(args, name, workers)
    with deadline(args.call_limit_s, f"{name}: settling and draining {batches} batches"):
        settle()
        drain(iterator, batches)


def drain_batches(args, name: str, workers: int) -> int:
    """Batches to take untimed: more than the loader `name` may hold prefetched (`--drain` if given).

    Ours: per worker, at most 2 queued chunks, one being put, one being made and a few in the
    main process's reader thread (8 chunks in all, counted generously); the reference: 2 batches
    per worker (the DataLoader's prefetch_factor).
    """
    if args.drain is not None:
        return args.drain
    from bioclip_jax.data.batching import chunk_size  # noqa: PLC0415

    held = 8 * chunk_size(args.batch) if name != _timing.REFERENCE else 2 * args.batch
    return math.ceil(max(1, workers) * held / args.batch) + 4


def cpu_figures(row: dict, name: str, images: int, timed: list[tuple[float, float]]) -> None:
    """Images per CPU-second (main and workers together) and each one's microseconds per image."""
    main, workers = sum(m for m, _ in timed), sum(w for _, w in timed)
    total = images * len(timed)
    row[name]["cpu_seconds"] = [m + w for m, w in timed]
    row[name]["parent_cpu_seconds"] = [m for m, _ in timed]
    row[name]["workers_cpu_seconds"] = [w for _, w in timed]
    # In clock ticks (10 ms, where schedstat is missing) a call served from a full buffer can read 0.
    row[name]["images_per_cpu_second"] = total / (main + workers) if main + workers else None
    row[name]["parent_cpu_us_per_image"] = 1e6 * main / total
    row[name]["workers_cpu_us_per_image"] = 1e6 * workers / total


def print_main_process(row: dict, sides: tuple[str, ...]) -> None:
    print("main process CPU per image: " + ", ".join(
        f"{name} {row[name]['parent_cpu_us_per_image']:.1f} us" for name in sides) +
        f" (target <= {MAIN_PROCESS_US_TARGET:g} us for ours); worker processes: " + ", ".join(
        f"{name} {row[name]['workers_cpu_us_per_image']:.0f} us" for name in sides))


def timed_out_row(label: str, error: TimedOut, loaders: dict) -> dict:
    print(f"{label}: timed out: {error}")
    for loader in loaders.values():
        close_loader(loader)
    return {"label": label, "timed_out": str(error)}


def measure_loaders(args, shards: list[str]) -> tuple[dict, dict]:
    """Ours vs the reference: the compare() row with images per CPU-second, and the live loaders
    (none, and a row saying which side timed out, if one did)."""
    images = args.batch * args.batches
    label = f"loader, {args.workers} workers (B={args.batch})"
    loaders = {_timing.OURS: ours_loader(shards, args.batch, args.workers, args.text_type, args.image_size),
               _timing.REFERENCE: open_clip_train_loader(shards, args.batch, args.workers, args.text_type,
                                                         args.image_size)}
    cpu = {name: [] for name in loaders}
    try:
        row = _timing.side_by_side(
            label, *(pull(loaders[name], args.batches, cpu[name], args.call_limit_s, name) for name in loaders),
            images, args.repeats, args.warmup, unit="images/s",
            before_each=lambda name: prepare(name, loaders[name], args, args.workers))
    except TimedOut as error:
        return timed_out_row(label, error, loaders), {}
    for name in loaders:
        cpu_figures(row, name, images, cpu[name][-args.repeats:])
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
    print_main_process(row, tuple(loaders))
    return row, loaders


def ours_alone(label: str, first, second, sides: tuple[str, str], args, target: float, meaning: str,
               workers: tuple[int, int]) -> dict:
    """Two of our loaders side by side (first's speed / second's is the row's ratio).

    Each side also reports the cores its process tree got (CPU seconds / wall seconds of
    the timed calls): on a shared machine a side given 2 cores may get fewer.
    """
    loaders = dict(zip(sides, (first, second)))
    cpu = {name: [] for name in sides}
    try:
        row = _timing.side_by_side(
            label, *(pull(loaders[name], args.batches, cpu[name], args.call_limit_s, name) for name in sides),
            args.batch * args.batches, args.repeats, args.warmup, unit="images/s", sides=sides,
            before_each=lambda name: prepare(name, loaders[name], args, workers[sides.index(name)]))
    except TimedOut as error:
        return timed_out_row(label, error, loaders)
    _timing.print_rows([row])
    row["target"] = target
    for name in sides:
        cpu_figures(row, name, args.batch * args.batches, cpu[name][-args.repeats:])
        row[name]["cores_used"] = sum(row[name]["cpu_seconds"]) / sum(row[name]["seconds"])
    print("cores used: " + ", ".join(f"{name} {row[name]['cores_used']:.2f}" for name in sides) +
          "; images per CPU-second: " + ", ".join(
              f"{name} {row[name]['images_per_cpu_second'] or 0:.1f}" for name in sides))
    print_main_process(row, sides)
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
    try:
        return ours_alone(f"ours, 2 vs 1 cores (B={args.batch})", two, one, ("2 cores", "1 core"), args,
                          SCALING_TARGET, "scaling from 1 to 2 cores", (2, 1))
    finally:
        close_loader(two)
        close_loader(one)


def measure_read_latency(args, shards: list[str], plain) -> dict:
    """Our loader over a source that waits before every read vs the same loader without the wait."""
    latency = args.read_latency_ms / 1000
    print(f"\nour loader, {args.workers} workers: {args.read_latency_ms:g} ms before every sample read vs none")
    slow = ours_loader(shards, args.batch, args.workers, args.text_type, args.image_size, read_latency=latency)
    try:
        return ours_alone(f"ours, {args.read_latency_ms:g} ms reads (B={args.batch})", slow, plain,
                          (f"{args.read_latency_ms:g} ms reads", "no latency"), args, LATENCY_TARGET,
                          "throughput kept with slow reads", (args.workers, args.workers))
    finally:
        close_loader(slow)


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
    close_loader(loader)
    return row


# ----------------------------------------------------------------------------- scaling


def sweep_point(args, shards: list[str], workers: int) -> dict:
    """Images/s of our loader with `workers` workers, and where its CPU goes (see the module docstring)."""
    from bioclip_jax.data.batching import chunk_size  # noqa: PLC0415

    warmup = max(2, math.ceil(2 * workers * chunk_size(args.batch) / args.batch))
    point = {"workers": workers, "warmup_batches": warmup, "batches": 0, "stopped_by_limit": False}
    started = time.monotonic()
    soft_end = started + args.point_limit_s
    loader = ours_loader(shards, args.batch, workers, args.text_type, args.image_size)
    try:
        with deadline(args.point_limit_s + HARD_LIMIT_GRACE_S, f"{workers} workers"):
            for _ in range(warmup):
                next(loader)
                if time.monotonic() > soft_end:
                    raise TimedOut(f"{workers} workers: the {warmup} warm-up batches took over "
                                   f"{args.point_limit_s:g} s")
            point["startup_s"] = time.monotonic() - started
            workers_before, main_before, start = workers_cpu_seconds(), main_cpu_seconds(), time.perf_counter()
            for _ in range(args.batches):
                touch(next(loader))
                point["batches"] += 1
                if time.monotonic() > soft_end:
                    point["stopped_by_limit"] = True
                    break
            seconds, main = time.perf_counter() - start, main_cpu_seconds() - main_before
            workers_cpu = workers_cpu_seconds() - workers_before
    except TimedOut as error:
        point["timed_out"] = str(error)
        return point
    finally:
        close_loader(loader)
    images = point["batches"] * args.batch
    point.update(seconds=seconds, images=images, images_per_s=images / seconds,
                 parent_cpu_us_per_image=1e6 * main / images,
                 workers_cpu_us_per_image=1e6 * workers_cpu / images,
                 images_per_worker_cpu_second=images / workers_cpu if workers_cpu else None,
                 cores_busy=(main + workers_cpu) / seconds)
    return point


def measure_scaling(args, shards: list[str]) -> dict:
    """`sweep_point` at each worker count of --scaling, and each one's speed against one worker's:
    {"scaling": one row per worker count, "scaling_settings": how they were measured}."""
    print(f"\nour loader alone, batch {args.batch}: {args.batches} timed batches per worker count "
          f"(limit {args.point_limit_s:g} s each), {len(os.sched_getaffinity(0))} usable CPUs")
    points = []
    for workers in args.scaling:
        points.append(sweep_point(args, shards, workers))
        point = points[-1]
        if "timed_out" in point:
            print(f"{workers:>3} workers: timed out ({point['timed_out']})")
        else:
            print(f"{workers:>3} workers: {point['images_per_s']:8.0f} images/s over {point['batches']} batches"
                  f"{' (stopped by the time limit)' if point['stopped_by_limit'] else ''}; main process "
                  f"{point['parent_cpu_us_per_image']:.1f} us/image, "
                  f"workers {point['workers_cpu_us_per_image']:.0f} us/image "
                  f"({point['images_per_worker_cpu_second'] or 0:.0f} images per worker CPU-second), "
                  f"{point['cores_busy']:.1f} cores busy")
    one = next((p for p in points if p["workers"] == 1 and "images_per_s" in p), None)
    print(f"\n{'workers':>8} {'images/s':>10} {'x 1 worker':>11} {'per worker':>11} {'main us/img':>12} "
          f"{'worker us/img':>14}")
    for point in points:
        if "images_per_s" not in point:
            print(f"{point['workers']:>8} {'timed out':>10}")
            continue
        if one is not None:
            point["ratio_to_one_worker"] = point["images_per_s"] / one["images_per_s"]
        ratio = point.get("ratio_to_one_worker")
        times = f"{ratio:.2f}x" if ratio else "-"
        per_worker = f"{ratio / max(1, point['workers']):.2f}" if ratio else "-"
        print(f"{point['workers']:>8} {point['images_per_s']:10.0f} {times:>11} {per_worker:>11} "
              f"{point['parent_cpu_us_per_image']:12.1f} {point['workers_cpu_us_per_image']:14.0f}")
    main_worst = max((p["parent_cpu_us_per_image"] for p in points if "images_per_s" in p), default=None)
    if main_worst is not None:
        print(f"main process: at most {main_worst:.1f} us of CPU per image (target <= {MAIN_PROCESS_US_TARGET:g}: "
              f"{'meets' if main_worst <= MAIN_PROCESS_US_TARGET else 'misses'})")
    target_workers, target_ratio = SWEEP_TARGET
    at_target = next((p for p in points if p["workers"] == target_workers and "ratio_to_one_worker" in p), None)
    if at_target is not None:
        print(f"{target_workers} workers: {at_target['ratio_to_one_worker']:.2f}x one worker (target >= "
              f"{target_ratio:g}x on >= {target_workers + 1} cores: "
              f"{'meets' if at_target['ratio_to_one_worker'] >= target_ratio else 'misses'})")
    return {"scaling": points, "scaling_settings": {
        "batch": args.batch, "batches_per_point": args.batches, "point_limit_s": args.point_limit_s,
        "usable_cpus": len(os.sched_getaffinity(0)), "timed_out": [p["workers"] for p in points if "timed_out" in p]}}


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", help="tar shard pattern (default: synthetic shards made in a temp dir)")
    parser.add_argument("--samples", type=int, default=1024, help="synthetic images to make (default %(default)s)")
    parser.add_argument("--num-shards", type=int, default=4, help="synthetic shards to make (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=224, help="stored and cropped size (default %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="loader worker processes, each side (default %(default)s)")
    parser.add_argument("--batches", type=int, default=16, help="batches per timed call (default %(default)s)")
    parser.add_argument("--drain", type=int,
                        help="untimed batches before each timed call, to empty the prefetch buffers "
                             "(default: per worker, ours 8 chunks, the reference 2 batches, + 4 batches)")
    parser.add_argument("--call-limit-s", type=float, default=300.0,
                        help="deadline of one timed call, and of the settling and draining before it: a loader "
                             "that gives nothing for this long is reported as timed out (default %(default)s)")
    parser.add_argument("--scaling", type=lambda text: [int(w) for w in text.split(",")],
                        help="worker counts, e.g. 1,4,15: only our loader, images/s at each (no reference)")
    parser.add_argument("--point-limit-s", type=float, default=40.0,
                        help="--scaling: time for one worker count's start-up and batches (default %(default)s)")
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
    args.feed_model = args.feed_model or ("ViT-Tiny-8" if args.quick else "ViT-B-16")
    if min(args.samples, args.num_shards, args.batch, args.batches, args.repeats, args.feed_repeats) < 1:
        parser.error("--samples, --num-shards, --batch, --batches and the repeats must be >= 1")
    if args.workers < 0 or (args.scaling and min(args.scaling) < 0):
        parser.error("--workers and the --scaling counts must be >= 0")
    if not args.shards and not args.scaling:  # every reference worker needs a batch per epoch (module docstring)
        shards, samples = max(args.num_shards, args.workers), max(args.samples, args.batch * max(1, args.workers))
        if (shards, samples) != (args.num_shards, args.samples):
            print(f"note: {samples} samples in {shards} shards, so that each of open_clip_train's "
                  f"{args.workers} workers gets a batch of {args.batch} per epoch")
        args.num_shards, args.samples = shards, samples
    if args.read_latency_ms <= 0:
        parser.error("--read-latency-ms must be > 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))  # before --threads narrows this process
    threads = _timing.pin_threads(args.threads, torch_too=not args.scaling)
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
        if args.scaling:
            result = measure_scaling(args, shards)
            timed_out = bool(result["scaling_settings"]["timed_out"])
        else:
            result, timed_out = compare_loaders(args, shards, cores), False
            timed_out = any(isinstance(row, dict) and "timed_out" in row for row in result.values())
    _timing.write_json(args.out, {"benchmark": "data", "args": vars(args), "target_ratio": TARGET,
                                  "machine": machine, "cpu_clock": CPU_CLOCK, "load_average_after": os.getloadavg(),
                                  **result})
    return 3 if timed_out else 0


def compare_loaders(args, shards: list[str], cores: list[int]) -> dict:
    """Ours vs the reference, then (unless --no-extra, and only if that finished) ours on 2 cores vs 1
    and with slow reads, and --feed."""
    print(f"{len(shards)} shards, batch {args.batch}, {args.workers} workers each, {args.batches} batches "
          f"per call, {args.repeats} interleaved rounds, {len(os.sched_getaffinity(0))} cores")
    row, loaders = measure_loaders(args, shards)
    result = {"loader": row}
    try:
        if "timed_out" not in row:
            if not args.no_extra:
                result["cores"] = measure_cores(args, shards, cores)
                result["read_latency"] = measure_read_latency(args, shards, loaders[_timing.OURS])
            if args.feed:
                result["feed"] = measure_feed(args, shards)
    finally:
        for loader in loaders.values():
            close_loader(loader)
    return result


if __name__ == "__main__":
    sys.exit(main())
