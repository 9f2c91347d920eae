"""Summarises benchmarks/gpu_check.sh's train-step records: MFU, ratio to open_clip, both loss trajectories.

    python benchmarks/gpu_check_summary.py OUT_DIR    # reads OUT_DIR/train_step_remat_*.json

Writes OUT_DIR/summary.json and OUT_DIR/summary.md and prints the latter. Exit status 1
when no record is there (no run finished); missed targets are reported, not an error.
"""

from __future__ import annotations

import glob
import json
import os
import sys

import _timing


def summarise(record: dict) -> dict:
    """One remat setting: throughput of both sides, ratio, MFU and losses, against the targets."""
    (row,) = [r for r in record["rows"] if r["sides"] == [_timing.OURS, _timing.REFERENCE]]
    ours, reference = row[_timing.OURS], row[_timing.REFERENCE]
    losses = row["losses"]
    pairs = list(zip(losses[_timing.OURS], losses[_timing.REFERENCE]))
    args = record["args"]
    return {
        "remat": args["remat"], "attention": args["attention"], "model": args["model"], "dtype": args["dtype"],
        "batch": args["batch"], "device_kind": record.get("device_kind"), "peak_tflops": record["peak_tflops"],
        "images_per_s": {side: {"best": row[side]["items_per_s_best"], "median": row[side]["items_per_s_median"]}
                         for side in row["sides"]},
        "ratio_of_mins": row["ratio_of_mins"], "ratio_of_medians": row["ratio_of_medians"],
        "mfu_best": {_timing.OURS: ours["mfu_best"], _timing.REFERENCE: reference["mfu_best"]},
        "losses": losses,
        "largest_relative_loss_difference": max((abs(a - b) / max(abs(b), 1e-12) for a, b in pairs), default=None),
        "targets": {"ratio": record["target_ratio"], "mfu": record["mfu_target"]},
        "meets_ratio": row["ratio_of_medians"] >= record["target_ratio"],
        "meets_mfu": None if record["mfu_target"] is None or ours["mfu_best"] is None
        else ours["mfu_best"] >= record["mfu_target"],
    }


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def markdown(runs: list[dict]) -> str:
    lines = ["| remat | attention | batch | bioclip_jax img/s (best / median) | open_clip img/s | ratio (min / med) "
             "| MFU ours / open_clip | largest loss difference |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        ours, ref = (run["images_per_s"][side] for side in (_timing.OURS, _timing.REFERENCE))
        mfu = run["mfu_best"]
        lines.append(f"| {run['remat']} | {run['attention']} | {run['batch']} "
                     f"| {ours['best']:.1f} / {ours['median']:.1f} "
                     f"| {ref['best']:.1f} / {ref['median']:.1f} | {run['ratio_of_mins']:.2f}x / "
                     f"{run['ratio_of_medians']:.2f}x | {_percent(mfu[_timing.OURS])} / "
                     f"{_percent(mfu[_timing.REFERENCE])} | {run['largest_relative_loss_difference']:.1e} |")
    first = runs[0]
    peak = f"peak {first['peak_tflops']:g} TFLOP/s" if first["peak_tflops"] else "no known peak"
    lines += ["", f"{first['model']} {first['dtype']} on {first['device_kind']} ({peak}). "
              f"Targets: ratio >= {first['targets']['ratio']}x by medians"
              + (f", MFU >= {first['targets']['mfu']:.0%}." if first['targets']['mfu'] else "."), ""]
    for run in runs:
        verdict = "meets" if run["meets_ratio"] else "misses"
        mfu = {None: "no MFU (unknown peak)", True: "meets the MFU target", False: "misses the MFU target"}
        lines.append(f"- remat {run['remat']}: {verdict} the ratio target, {mfu[run['meets_mfu']]}.")
    lines += ["", "Losses step by step (same weights, batch and optimiser):", ""]
    for run in runs:
        for side, values in run["losses"].items():
            lines.append(f"- remat {run['remat']}, {side}: {' '.join(f'{v:.5f}' for v in values)}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = argv[0]
    paths = sorted(glob.glob(os.path.join(out_dir, "train_step_remat_*.json")),
                   key=lambda p: (not p.endswith("_none.json"), p))
    if not paths:
        print(f"no train_step_remat_*.json in {out_dir}: no run finished (see gpu_check.log)")
        return 1
    runs = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            runs.append(summarise(json.load(f)))
    with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"runs": runs}, f, indent=2)
    text = markdown(runs)
    with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
