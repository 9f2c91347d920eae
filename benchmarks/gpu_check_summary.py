"""Summarises benchmarks/gpu_check.sh's records: every figure against its target, in summary.md and summary.json.

    python benchmarks/gpu_check_summary.py RECORDS --out OUT_DIR   # reads RECORDS/*.json
    python benchmarks/gpu_check_summary.py --best-setting RECORDS  # prints ours' fastest ViT-B/16 setting

Records (each optional: a part that did not run is reported as not run): steps.json and
large.json (benchmarks/gpu_step.py ours), reference.json (gpu_step.py open_clip), loader.json
(benchmarks/data.py --scaling), loop.json (benchmarks/loop_figure.py), flags_*.json (gpu_step.py
ours under other XLA_FLAGS), archive.json (benchmarks/predict.py --archive). Exit status 1 when
no record is there; missed targets are reported, not an error.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

TARGETS = {"ratio_to_open_clip": 1.5, "mfu_vit_b16": 0.35, "mfu_vit_l14": 0.45, "loop_vs_bare_step": 0.95,
           "loader_15_vs_1_worker": 10.0, "predict_vs_image_tower": 0.9}


def _read(records: str, name: str) -> dict | None:
    path = os.path.join(records, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _ran(record: dict | None) -> list[dict]:
    return [s for s in (record or {}).get("settings", []) if "images_per_s_best" in s]


def best_setting(record: dict | None) -> dict | None:
    ran = _ran(record)
    return max(ran, key=lambda s: s["images_per_s_median"]) if ran else None


def _percent(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _verdict(value, target) -> str:
    if value is None:
        return "not measured"
    return "meets" if value >= target else "misses"


def _settings_table(record: dict | None, title: str) -> list[str]:
    if not record:
        return [f"{title}: not run.", ""]
    lines = [f"{title} ({record.get('model')}, {record.get('device_kind')}, peak "
             f"{record.get('peak_tflops') or 'unknown'} TFLOP/s):", "",
             "| setting | batch | img/s best / median | MFU | kept MiB/pair | first step s | first loss | note |",
             "|---|---|---|---|---|---|---|---|"]
    for s in record["settings"]:
        if "images_per_s_best" in s:
            kept = s.get("saved_bytes_per_pair")
            oom = f"OOM at {s['out_of_memory_at']}" if s.get("out_of_memory_at") else ""
            lines.append(f"| {s['setting']} | {s['batch']} "
                         f"| {s['images_per_s_best']:.0f} / {s['images_per_s_median']:.0f} "
                         f"| {_percent(s.get('mfu_best'))} | {'' if kept is None else f'{kept / 2 ** 20:.1f}'} "
                         f"| {s.get('first_step_s', 0):.0f} | {s['losses'][0]:.5f} | {oom} |")
        else:
            lines.append(f"| {s['setting']} | | | | | | | {s.get('error', 'no result')} |")
    return lines + [""]


def _loss_agreement(ours: dict | None, reference: dict | None) -> list[str]:
    """First-step losses of ours and open_clip at equal batches: same weights, same data."""
    lines = []
    for r in _ran(reference):
        for o in _ran(ours):
            if o["batch"] == r["batch"]:
                difference = abs(o["losses"][0] - r["losses"][0]) / abs(r["losses"][0])
                lines.append(f"- batch {o['batch']}: ours ({o['setting']}) {o['losses'][0]:.5f}, open_clip "
                             f"({r['setting']}) {r['losses'][0]:.5f}, relative difference {difference:.1e}")
    return lines or ["- no setting of ours ran at an open_clip batch: no first-step loss comparison"]


def _loader(record: dict | None) -> tuple[list[str], float | None]:
    if not record or not record.get("scaling"):
        return ["Loader scaling: not run.", ""], None
    rows = [r for r in record["scaling"] if "images_per_s" in r]  # a point that timed out has none
    lines_timed_out = [f"- {r['workers']} workers: timed out" for r in record["scaling"] if "images_per_s" not in r]
    one = next((r for r in rows if r["workers"] == 1), None)
    lines = ["Loader (224 px synthetic JPEGs):", "", "| workers | img/s | vs 1 worker | parent CPU us/img |",
             "|---|---|---|---|"]
    ratio = None
    for r in rows:
        vs = r["images_per_s"] / one["images_per_s"] if one and one.get("images_per_s") else None
        if r["workers"] == 15:
            ratio = vs
        parent = r.get("parent_cpu_us_per_image")
        lines.append(f"| {r['workers']} | {r['images_per_s']:.0f} | {'' if vs is None else f'{vs:.2f}x'} "
                     f"| {'' if parent is None else f'{parent:.0f}'} |")
    return lines + ["", *lines_timed_out, ""], ratio


def _archive(record: dict | None) -> list[str]:
    if not record:
        return ["Predict over an archive: not run (`--parts archive`).", ""]
    figures = record["figures"]
    size = "x".join(map(str, record["image_size"]))
    lines = [f"Predict over an archive ({record['images']} JPEGs of {size}, {record['arch']}, batch {record['batch']}, "
             f"{record['machine']['logical_cores']} CPU cores): bare image tower "
             f"{figures['tower_images_per_s']:.0f} img/s; ours / tower (steady medians): "
             + ", ".join(f"{name} {ratio:.3f}" for name, ratio in figures["ours_vs_tower"].items()) + "."]
    if figures["cores_to_feed_the_tower"] is not None:
        lines.append(f"Cores to feed the tower: about {figures['cores_to_feed_the_tower']:.1f} (its rate / one "
                     f"decoder's).")
    return lines + [""]


def summarise(records: str) -> tuple[dict, str]:
    steps, reference, large = (_read(records, n) for n in ("steps", "reference", "large"))
    loader, loop, archive = _read(records, "loader"), _read(records, "loop"), _read(records, "archive")
    flags = {os.path.basename(p)[len("flags_"):-len(".json")]: _read(records, os.path.basename(p)[:-5])
             for p in sorted(glob.glob(os.path.join(records, "flags_*.json")))}
    ours_best, reference_best, large_best = best_setting(steps), best_setting(reference), best_setting(large)
    ratio = (ours_best["images_per_s_median"] / reference_best["images_per_s_median"]
             if ours_best and reference_best else None)
    loop_row = (loop or {}).get("loop")
    loop_ratio = loop_row["ratio_of_medians"] if loop_row else None
    loader_lines, loader_ratio = _loader(loader)
    figures = {
        "ratio_to_open_clip": ratio,
        "mfu_vit_b16": ours_best and ours_best.get("mfu_best"),
        "mfu_vit_l14": large_best and large_best.get("mfu_best"),
        "loop_vs_bare_step": loop_ratio,
        "loader_15_vs_1_worker": loader_ratio,
        "predict_vs_image_tower": archive and archive["figures"]["best_ours_vs_tower"],
    }
    lines = ["# GPU check", ""]
    device = (next((r.get("device_kind") for r in (steps, reference, large) if r), None)
              or (archive or {}).get("device", "unknown device"))
    lines += [f"Device: {device}. Each framework ran in its own process, at the largest batch it fits "
              "(ours: from the activations the gradient keeps; open_clip: the batches tried).", "",
              "| figure | measured | target | verdict |", "|---|---|---|---|"]
    names = {"ratio_to_open_clip": "ViT-B/16 img/s, ours best / open_clip best (medians)",
             "mfu_vit_b16": "ViT-B/16 MFU, ours best", "mfu_vit_l14": "ViT-L/14 MFU, ours best",
             "loop_vs_bare_step": "training loop with the real loader / bare step (medians)",
             "loader_15_vs_1_worker": "loader img/s, 15 workers / 1 worker",
             "predict_vs_image_tower": "predict over an archive / bare image tower (steady medians)"}
    for key, target in TARGETS.items():
        value = figures[key]
        shown = "n/a" if value is None else (f"{value:.1%}" if key.startswith("mfu") else f"{value:.2f}x")
        goal = f"{target:.0%}" if key.startswith("mfu") else f">= {target}x"
        lines.append(f"| {names[key]} | {shown} | {goal} | {_verdict(value, target)} |")
    lines += [""]
    if ours_best:
        lines += [f"Ours best ViT-B/16: {ours_best['setting']} at batch {ours_best['batch']}."]
    if reference_best:
        lines += [f"open_clip best: {reference_best['setting']} at batch {reference_best['batch']}."]
    lines += ["", *_settings_table(steps, "ViT-B/16, ours"),
              *_settings_table(reference, "ViT-B/16, open_clip AMP bf16"),
              *_settings_table(large, "ViT-L/14, ours"), "First-step losses (same weights and data):", "",
              *_loss_agreement(steps, reference), "", *loader_lines]
    if loop_row:
        lines += [f"Training loop vs bare step ({loop_row.get('label', '')}): loop "
                  f"{loop_row['loop']['items_per_s_median']:.0f} img/s, bare step "
                  f"{loop_row['bare_step']['items_per_s_median']:.0f} img/s (medians).", ""]
    else:
        lines += ["Training loop vs bare step: not run.", ""]
    lines += _archive(archive)
    if flags:
        lines += ["The best setting again, each line in a fresh process (flags_baseline: as it is, and unrolled):", "",
                  "| record | XLA_FLAGS | setting | img/s best / median |", "|---|---|---|---|"]
        for name, record in flags.items():
            for s in (record or {}).get("settings", []):
                shown = (f"{s['images_per_s_best']:.0f} / {s['images_per_s_median']:.0f}" if "images_per_s_best" in s
                         else s.get("error", "failed"))
                lines.append(f"| {name} | `{record.get('xla_flags', '')}` | {s['setting']} | {shown} |")
        lines.append("")
    payload = {"targets": TARGETS, "figures": figures, "steps": steps, "reference": reference, "large": large,
               "loader": loader, "loop": loop, "flags": flags, "archive": archive}
    return payload, "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records")
    parser.add_argument("--out", help="folder for summary.md and summary.json (default: the records folder)")
    parser.add_argument("--best-setting", action="store_true",
                        help="print ours' fastest ViT-B/16 setting as ATTENTION:REMAT:BATCH and stop")
    args = parser.parse_args(argv)
    if args.best_setting:
        best = best_setting(_read(args.records, "steps"))
        if best:
            layers = "" if best.get("scan_layers", True) else "@unrolled"
            print(f"{best['attention']}:{best['remat']}:{best['batch']}{layers}")
        return 0 if best else 1
    if not glob.glob(os.path.join(args.records, "*.json")):
        print(f"no records in {args.records}: no part finished (see gpu_check.log)")
        return 1
    payload, text = summarise(args.records)
    out = args.out or args.records
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=float)
    with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
