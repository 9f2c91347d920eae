"""The README's main job as a user runs it: wall time and held-out zero-shot top-1.

    python benchmarks/main_job.py                 # twice: with an empty compilation cache, then a warm one
    python benchmarks/main_job.py --runs 1 --set data.batch_size=128 --set total_steps=300

Each run is the whole command (`bioclip-jax train --config=configs/synthetic_tiny.py`) in a fresh
workdir: generating the synthetic tree, compiling, training, the periodic and final evaluations,
and the export. The first run starts with an empty compilation cache (a fresh machine); later runs
reuse it, as a user's second try does. The issue's target: at most 6 minutes on the 2-core CPU
machine, with held-out zero-shot top-1 (taxon_com) of at least 60%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        return f"{names[0]} x {len(names)}" if names else platform.processor()
    except OSError:
        return platform.processor()


def _final_zero_shot(workdir: str) -> dict[str, float]:
    """Held-out zero-shot top-1 per text type of the last evaluation in metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as lines:
        evals = [json.loads(line) for line in lines if "zero_shot_top1" in line]
    final = evals[-1]
    return {key.split("/")[1]: value for key, value in final.items()
            if key.startswith("eval/") and key.endswith("/zero_shot_top1")}


def run_once(settings: list[str], cache_dir: str) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as scratch:
        workdir = os.path.join(scratch, "tiny")
        command = [sys.executable, "-m", "bioclip_jax.cli.main", "train", "--config=configs/synthetic_tiny.py",
                   f"--workdir={workdir}", *(f"--config.{item}" for item in settings)]
        environment = dict(os.environ, BIOCLIP_JAX_CACHE=cache_dir)
        start = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        if result.returncode:
            sys.exit(f"the main job failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
        return time.perf_counter() - start, _final_zero_shot(workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs; the first with an empty compilation cache")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config override, as --config.FIELD=VALUE of the train command")
    args = parser.parse_args()
    print(f"CPU: {_cpu_model()}; settings: {args.set or 'configs/synthetic_tiny.py as is'}")
    with tempfile.TemporaryDirectory() as cache_dir:
        for run in range(args.runs):
            seconds, zero_shot = run_once(args.set, cache_dir)
            cache = "empty" if run == 0 else "warm"
            scores = " ".join(f"{name} {value:.1f}%" for name, value in zero_shot.items())
            print(f"run {run + 1} ({cache} compilation cache): {seconds / 60:.2f} min; "
                  f"held-out zero-shot top-1 {scores}", flush=True)


if __name__ == "__main__":
    main()
