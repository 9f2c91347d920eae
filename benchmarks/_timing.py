"""Interleaved side-by-side timing, the summary table, and the JSON record shared by the benchmarks.

Shared machines are noisy: another job can slow one measurement by 2x. So both
sides are timed in the same run, interleaved (ours, reference, ours, reference, ...),
several times; the minimum says what the code can do, the median what it usually
does. Ratios are reference time / our time, so > 1 means bioclip_jax is faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from typing import Callable, Mapping

OURS, REFERENCE = "bioclip_jax", "open_clip"


@dataclasses.dataclass
class Samples:
    """Wall-clock seconds of repeated calls that each process `items` items."""

    seconds: list[float]
    items: int

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def summary(self) -> dict:
        return {"items_per_call": self.items, "min_s": self.min, "median_s": self.median,
                "items_per_s_best": self.items / self.min, "items_per_s_median": self.items / self.median,
                "seconds": self.seconds}


def time_interleaved(contenders: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1,
                     before_each: Callable[[str], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each contender; each round calls them all once, in the given order.

    The warm-up rounds (compilation, allocator growth, worker start-up) are not timed.
    A contender must block until its work is done (e.g. `jax.block_until_ready`).
    `before_each(name)` runs, untimed, before every timed call of contender `name` (e.g. to let
    background work settle).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for run in contenders.values():
            run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            if before_each is not None:
                before_each(name)
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def compare(label: str, ours: Samples, reference: Samples, unit: str = "items/s",
            sides: tuple[str, str] = (OURS, REFERENCE)) -> dict:
    """One result row: both sides' min/median and the speed ratios (reference time / our time).

    `sides` names the two (ours first); the row stores each side's summary under its name.
    """
    return {"label": label, "unit": unit, "sides": list(sides), sides[0]: ours.summary(),
            sides[1]: reference.summary(),
            "ratio_of_mins": reference.min / ours.min * ours.items / reference.items,
            "ratio_of_medians": reference.median / ours.median * ours.items / reference.items}


def side_by_side(label: str, ours: Callable[[], object], reference: Callable[[], object], items: int,
                 repeats: int, warmup: int = 1, unit: str = "items/s", sides: tuple[str, str] = (OURS, REFERENCE),
                 before_each: Callable[[str], object] | None = None) -> dict:
    """Times two callables that each process `items` items, interleaved, and returns the compare() row."""
    seconds = time_interleaved({sides[0]: ours, sides[1]: reference}, repeats, warmup, before_each)
    return compare(label, Samples(seconds[sides[0]], items), Samples(seconds[sides[1]], items), unit, sides)


def with_variant(label: str, contenders: dict[str, Callable[[], object]], variant: str | None, items: int,
                 repeats: int, warmup: int = 1, unit: str = "items/s") -> list[dict]:
    """Ours vs the reference, plus, when `contenders` holds a third entry named `variant`, that
    variant vs the reference and vs ours as is, all three timed in the same interleaved rounds."""
    seconds = time_interleaved(contenders, repeats, warmup)
    samples = {name: Samples(values, items) for name, values in seconds.items()}
    rows = [compare(label, samples[OURS], samples[REFERENCE], unit)]
    if variant is not None:
        rows.append(compare(label, samples[variant], samples[REFERENCE], unit, (variant, REFERENCE)))
        rows.append(compare(label, samples[variant], samples[OURS], unit, (variant, OURS)))
    return rows


def print_rows(rows: list[dict], target: float | None = None) -> None:
    """A fixed-width table of compare() rows, plus whether each meets `target` (ratio of medians)."""
    label_width = max([28] + [len(row["label"]) + 1 for row in rows])
    header = None
    for row in rows:
        first, second = row["sides"]
        widths = [max(16, len(first) + 6), max(16, len(second) + 6)]
        if header != (first, second):
            if header is not None:
                print(f"(throughput in {row['unit']}; ratio = {header[1]} time / {header[0]} time)")
            header = (first, second)
            print(f"{'':{label_width}} {first + ' best':>{widths[0]}} {'median':>10} {second + ' best':>{widths[1]}} "
                  f"{'median':>10} {'ratio(min)':>11} {'ratio(med)':>11}")
        ours, ref = (row[side] for side in row["sides"])
        line = (f"{row['label']:{label_width}} {ours['items_per_s_best']:{widths[0]}.2f} "
                f"{ours['items_per_s_median']:10.2f} {ref['items_per_s_best']:{widths[1]}.2f} "
                f"{ref['items_per_s_median']:10.2f} {row['ratio_of_mins']:10.2f}x {row['ratio_of_medians']:10.2f}x")
        if target is not None and second == REFERENCE:
            line += "  meets" if row["ratio_of_medians"] >= target else f"  below {target:.2f}x"
        print(line)
    if header is not None:
        print(f"(throughput in {rows[-1]['unit']}; ratio = {header[1]} time / {header[0]} time)")


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per side (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for both frameworks (0 = every core this process may use)")
    parser.add_argument("--quick", action="store_true", help="small sizes and 2 rounds: finishes in < 1 minute")
    parser.add_argument("--out", help="write the result as JSON to this path")


def pin_threads(threads: int, torch_too: bool = True) -> int:
    """Gives both frameworks the same `threads` CPU cores; returns the count.

    XLA's CPU thread pool is sized from the process's CPU affinity when its client is
    first created, so the affinity is narrowed here, before any JAX computation; torch
    (imported here unless `torch_too` is False) gets `torch.set_num_threads`. Call
    before the first jax.devices() or jitted call.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if threads <= 0 or threads >= len(allowed):
        threads = len(allowed)
    else:
        os.sched_setaffinity(0, allowed[:threads])
    if torch_too:
        import torch  # noqa: PLC0415 - only the benchmarks depend on the reference
        torch.set_num_threads(threads)
    return threads


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int | None = None) -> dict:
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": _cpu_model(), "logical_cores": os.cpu_count(), "threads": threads,
            "load_average": os.getloadavg(), "python": platform.python_version(),
            "versions": {p: _version(p) for p in ("jax", "jaxlib", "flax", "torch", "open_clip_torch",
                                                  "webdataset", "grain")}}


def warn_if_busy(threads: int) -> None:
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) - threads + 0.5:
        print(f"note: 1-minute load average is {load:.2f} on {os.cpu_count()} cores; other work may "
              f"slow both sides (interleaving keeps the ratio fair, absolute figures less so)")


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=float)
    print(f"wrote {path}")
