"""Memory of the tar shard index at TreeOfLife-200M scale: per training process and per Grain worker.

    python benchmarks/index_memory.py                       # in memory at 5M, 20M; mapped at 20M, 200M
    python benchmarks/index_memory.py --quick               # 1M / 2M / 2M samples, seconds
    python benchmarks/index_memory.py --in-memory 5e6 --mapped 2e8 --repeats 3

The index is synthetic: sparse shard files (no image bytes; 10,000 samples of ~30 KB
each) with their per-shard index caches, as `TarShardSource` finds them after a first
scan. Each figure comes from a fresh process:
- process: RSS growth while `TarShardSource(shards)` opens the index, and its time;
- worker: the size of the pickled source (what Grain sends each spawned worker) and
  the RSS growth while a fresh process unpickles it, as a worker does;
- touched: the worker's RSS growth after reading the byte ranges of 100,000 random
  samples (a mapped index is read only where samples are read).
"in memory" is how every process held the index before (`source_index` off: every
shard index parsed, 16 bytes a sample, pickled whole into every worker); "mapped" is
one memory-mapped file per host. For comparison, ArrayRecord files (`--array-record`):
the memory of Grain's reader after reading one record of every file, with its record
index in memory (the default) and offloaded to disk. The in-memory figures are measured at smaller sizes
(parsing 200M samples of JSON needs more memory than a shared machine has) and
scaled by their bytes per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time

import _timing
import numpy as np

SAMPLE_BYTES = 30_000
TOUCHED = 100_000


# ----------------------------------------------------------------------------- synthetic index


def synthetic_shards(directory: str, samples: int, per_shard: int, joined: bool) -> list[str]:
    """Sparse shard files with per-shard index caches (or, with `joined`, only the joined mapped index)."""
    from bioclip_jax.data import shard_index, source_index  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    paths, counts = [], []
    for shard in range(-(-samples // per_shard)):
        count = min(per_shard, samples - shard * per_shard)
        path = os.path.join(directory, f"shard-{shard:06d}.tar")
        with open(path, "wb") as f:
            f.truncate(count * SAMPLE_BYTES + 1024)  # sparse: no bytes on disk
        paths.append(path)
        counts.append(count)
    stats = [shard_index.shard_stat(path) for path in paths]
    indexes = []
    for path, count, (size, mtime) in zip(paths, counts, stats):
        starts = np.arange(count, dtype=np.int64) * SAMPLE_BYTES
        index = shard_index.ShardIndex(path, size, mtime, starts, starts + SAMPLE_BYTES, num_members=2 * count)
        if joined:
            indexes.append(index)
            if len(indexes) == 1000 or path == paths[-1]:  # written in pieces, to stay small here too
                _append_joined(directory, indexes)
                indexes = []
        else:
            with open(path + shard_index.INDEX_SUFFIX, "w", encoding="utf-8") as f:
                f.write(index.to_json())
    if joined:
        _finish_joined(directory, paths, stats, source_index)
    return paths


def _append_joined(directory: str, indexes) -> None:
    with open(os.path.join(directory, "joined.bin"), "ab") as f:
        for index in indexes:
            f.write(np.stack([index.starts, index.ends], axis=1).astype("<i8").tobytes())
    with open(os.path.join(directory, "joined.shards"), "a", encoding="utf-8") as f:
        for index in indexes:
            f.write(json.dumps({"path": index.path, "size": index.size, "mtime": index.mtime, "count": len(index),
                                "num_members": index.num_members, "truncated_sample": -1,
                                "truncated_key": None}) + "\n")


def _finish_joined(directory: str, paths, stats, source_index) -> None:
    """Moves the joined pieces where `source_index` looks for this exact set of shards."""
    target = source_index.index_directory(None)
    os.makedirs(target, exist_ok=True)
    key = source_index._key(paths, stats)  # the same key the source computes
    with open(os.path.join(directory, "joined.shards"), encoding="utf-8") as f:
        shards = [json.loads(line) for line in f]
    with open(os.path.join(target, f"{key}.json"), "w", encoding="utf-8") as f:
        json.dump({"format": source_index.FORMAT, "version": source_index.VERSION, "shards": shards}, f)
    os.replace(os.path.join(directory, "joined.bin"), os.path.join(target, f"{key}.bin"))


def synthetic_array_records(directory: str, records: int, per_file: int) -> list[str]:
    """ArrayRecord files as `convert-shards` writes them (one record per chunk), of 64-byte records."""
    from array_record.python import array_record_module  # noqa: PLC0415

    from bioclip_jax.ingest.convert import FILE_NAME, WRITER_OPTIONS  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    paths = []
    for number in range(-(-records // per_file)):
        path = os.path.join(directory, FILE_NAME.format(number))
        writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
        for _ in range(min(per_file, records - number * per_file)):
            writer.write(b"x" * 64)
        writer.close()
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- one measurement per process


def rss() -> dict[str, int]:
    """Resident bytes of this process: anonymous (its own heap, what a process costs) and file-backed
    (mapped files: the kernel's page cache, one copy per host whatever the processes mapping it, evictable)."""
    found = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                name, value, _ = line.split()
                found["anon" if name == "RssAnon:" else "file"] = int(value) * 1024
    return found


def growth(before: dict[str, int]) -> dict[str, int]:
    now = rss()
    return {kind: now[kind] - before[kind] for kind in now}


def child(mode: str, pattern: str, pickled: str) -> dict:
    """One fresh process: open the source (or unpickle it as a worker), report memory."""
    from grain import sources  # noqa: PLC0415, F401 - imported before the baseline, as a worker has it
    from bioclip_jax.data import index_cache, shard_patterns, source_index, tar_source  # noqa: PLC0415

    if mode.startswith("in_memory"):  # the code before source_index: every shard index in this process
        source_index.load_source_index = lambda paths, cache_dir=None, num_threads=8: (
            index_cache.index_shards(paths, cache_dir, num_threads), None)
    paths = shard_patterns.expand_shard_pattern(pattern)
    before = rss()
    if mode.startswith("array_record"):
        return array_record_child(mode, paths, before)
    if mode.endswith("process"):
        start = time.perf_counter()
        source = tar_source.TarShardSource(paths)
        seconds = time.perf_counter() - start
        grown = growth(before)
        blob = pickle.dumps(source)
        with open(pickled, "wb") as f:
            f.write(blob)
        return {"growth": grown, "seconds": seconds, "pickled_bytes": len(blob), "samples": len(source)}
    with open(pickled, "rb") as f:
        source = pickle.loads(f.read())
    grown = growth(before)
    for index in np.random.default_rng(0).integers(0, len(source), TOUCHED):
        shard, local = source.locate(int(index))
        int(source.indexes[shard].starts[local]), int(source.indexes[shard].ends[local])
    return {"growth": grown, "touched_growth": growth(before), "samples": len(source)}


def array_record_child(mode: str, paths: list[str], before: dict[str, int]) -> dict:
    """Grain's ArrayRecord reader keeps each opened file's record index in memory (unless offloaded):
    a process that reads one record of every file, as a shuffled epoch soon does, holds them all."""
    from grain import sources  # noqa: PLC0415

    options = {"index_storage_option": "offloaded", "footer_prefetch_bytes": "0"} if "offloaded" in mode else None
    records = sources.ArrayRecordDataSource(paths, reader_options=options)
    opened = growth(before)
    per_file = len(records) // len(paths)
    for number in range(len(paths)):
        records[number * per_file]
    return {"growth": opened, "touched_growth": growth(before), "samples": len(records)}


def measure_array_record(mode: str, pattern: str, repeats: int) -> dict:
    runs = [json.loads(subprocess.run([sys.executable, __file__, "--child", mode, pattern, ""], capture_output=True,
                                      text=True, check=True).stdout.strip().splitlines()[-1]) for _ in range(repeats)]
    values = [run["touched_growth"]["anon"] for run in runs]
    return {"mode": mode, "samples": runs[0]["samples"],
            "every_file_read_anon": {"min": min(values), "median": statistics.median(values)}}


def measure(mode: str, pattern: str, scratch: str, repeats: int) -> dict:
    pickled = os.path.join(scratch, f"{mode}.pickle")
    runs = {"process": [], "worker": []}
    for _ in range(repeats):
        for role in runs:
            output = subprocess.run([sys.executable, __file__, "--child", f"{mode}_{role}", pattern, pickled],
                                    capture_output=True, text=True, check=True).stdout
            runs[role].append(json.loads(output.strip().splitlines()[-1]))
    os.remove(pickled)

    def summary(rows, *keys):
        values = []
        for row in rows:
            for key in keys:
                row = row[key]
            values.append(row)
        return {"min": min(values), "median": statistics.median(values)}

    return {"mode": mode, "samples": runs["process"][0]["samples"],
            "process_anon": summary(runs["process"], "growth", "anon"),
            "process_file": summary(runs["process"], "growth", "file"),
            "process_seconds": summary(runs["process"], "seconds"),
            "pickled_bytes": runs["process"][0]["pickled_bytes"],
            "worker_anon": summary(runs["worker"], "growth", "anon"),
            "worker_touched_anon": summary(runs["worker"], "touched_growth", "anon"),
            "worker_touched_file": summary(runs["worker"], "touched_growth", "file")}


# ----------------------------------------------------------------------------- main


HEADER = (f"{'index':>9} {'samples':>12} {'proc anon':>10} {'median':>9} {'open s':>7} {'pickle':>9} "
          f"{'worker':>9} {'touched':>9} {'(file)':>9} {'B/sample':>8} {'GiB @N':>8}")


def print_row(row: dict, scale_to: int) -> None:
    mib = 1 << 20
    per_sample = max(row["process_anon"]["median"], row["worker_anon"]["median"], 0) / row["samples"]
    print(f"{row['mode']:>9} {row['samples']:>12,} {row['process_anon']['min'] / mib:>10.1f} "
          f"{row['process_anon']['median'] / mib:>9.1f} {row['process_seconds']['median']:>7.2f} "
          f"{row['pickled_bytes'] / mib:>9.2f} {row['worker_anon']['median'] / mib:>9.1f} "
          f"{row['worker_touched_anon']['median'] / mib:>9.1f} {row['worker_touched_file']['median'] / mib:>9.1f} "
          f"{per_sample:>8.2f} {per_sample * scale_to / (1 << 30):>8.2f}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in-memory", type=float, nargs="+", default=[5e6, 2e7],
                        help="sample counts measured in memory (default 5e6 2e7)")
    parser.add_argument("--mapped", type=float, nargs="+", default=[2e7, 2e8],
                        help="sample counts measured mapped (default 2e7 2e8)")
    parser.add_argument("--array-record", type=float, nargs="*", default=[5e6],
                        help="records of the ArrayRecord comparison (default 5e6; none to skip)")
    parser.add_argument("--per-shard", type=int, default=10_000, help="samples per shard (default %(default)s)")
    parser.add_argument("--scale-to", type=float, default=2e8, help="the size figures are scaled to (default 2e8)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per figure (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="1M and 2M samples, 1 repeat")
    parser.add_argument("--out", help="write the result as JSON to this path")
    args = parser.parse_args(argv)
    if args.quick:
        args.in_memory, args.mapped, args.array_record, args.repeats = [1e6], [2e6], [1e6], 1
    return args


def main(argv=None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(child(*sys.argv[2:5])))
        return 0
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bioclip_jax_index_memory_") as scratch:
        os.environ["BIOCLIP_JAX_INDEX_CACHE"] = os.path.join(scratch, "cache")  # children inherit it
        print(HEADER)
        for mode, counts in (("in_memory", args.in_memory), ("mapped", args.mapped)):
            for count in counts:
                directory = os.path.join(scratch, f"{mode}-{int(count)}")
                synthetic_shards(directory, int(count), args.per_shard, joined=mode == "mapped")
                pattern = os.path.join(directory, f"shard-{{000000..{-(-int(count) // args.per_shard) - 1:06d}}}.tar")
                rows.append(measure(mode, pattern, scratch, args.repeats))
                print_row(rows[-1], int(args.scale_to))
        for count in args.array_record:
            directory = os.path.join(scratch, f"array_record-{int(count)}")
            paths = synthetic_array_records(directory, int(count), args.per_shard)
            pattern = os.path.join(directory, f"shard-{{000000..{len(paths) - 1:06d}}}.array_record")
            for mode in ("array_record", "array_record_offloaded"):
                rows.append(measure_array_record(mode, pattern, args.repeats))
                anon = rows[-1]["every_file_read_anon"]
                print(f"{mode:>22} {rows[-1]['samples']:>12,}: {anon['median'] / (1 << 20):.1f} MiB anonymous "
                      f"(min {anon['min'] / (1 << 20):.1f}) after reading a record of every file, "
                      f"{anon['median'] / rows[-1]['samples']:.1f} B/record")
    print(f"(MiB of anonymous resident memory, median over fresh processes unless 'min'. proc: opening the "
          f"source; open s: its seconds; pickle: what each spawned worker is sent; worker: a fresh process "
          f"unpickling it; touched: after also reading {TOUCHED:,} random samples' byte ranges; (file): the "
          f"mapped index pages those reads brought in, page cache shared by every process on the host; "
          f"B/sample and GiB @N: the larger of proc and worker, per sample and at N = {args.scale_to:.0e})")
    _timing.write_json(args.out, {"benchmark": "index_memory", "args": vars(args),
                                  "machine": _timing.machine_info(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
