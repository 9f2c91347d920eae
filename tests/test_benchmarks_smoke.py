"""The benchmark scripts still run end to end (tiny settings); speed is never asserted here.

Each script runs as its own process, as a user runs it: it pins threads and may set
JAX options that must come before JAX starts, which must not leak into this session.
"""

import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")
TINY = ["--quick", "--repeats", "1", "--warmup", "1", "--threads", "1"]


def run_script(name: str, *args: str, tmp_path) -> dict:
    out = tmp_path / f"{name}.json"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices are not the scripts' business
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run([sys.executable, os.path.join(BENCHMARKS, f"{name}.py"), *args, "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=240, check=False)
    assert result.returncode == 0, f"{name}.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


def sides(row: dict) -> list[dict]:
    return [row[name] for name in row["sides"]]


def assert_timed(row: dict, repeats: int = 1) -> None:
    for side in sides(row):
        assert len(side["seconds"]) == repeats
        assert all(s > 0 for s in side["seconds"])
        assert side["items_per_s_best"] >= side["items_per_s_median"] > 0
    assert row["ratio_of_mins"] > 0 and row["ratio_of_medians"] > 0


def test_encode_times_both_towers_of_the_same_model(tmp_path):
    result = run_script("encode", "--model", "ViT-Tiny-8", "--images", "2", "--texts", "4",
                        "--variant", "separate-qkv+unrolled-layers", *TINY, tmp_path=tmp_path)
    variant = "separate-qkv+unrolled-layers"
    pairs = [(row["label"], tuple(row["sides"])) for row in result["rows"]]
    assert pairs == [(f"{tower} fp32 (B={n})", sides)
                     for tower, n in (("image", 2), ("text", 4))
                     for sides in (("bioclip_jax", "open_clip"), (variant, "open_clip"), (variant, "bioclip_jax"))]
    for row in result["rows"]:
        assert_timed(row)
    differences = [row["relative_difference_to_ours"] for row in result["rows"] if row["sides"][0] == variant]
    assert len(differences) == 4 and max(differences) < 1e-4  # the candidate change computes the same thing
    assert result["machine"]["threads"] == 1


def test_encode_gemms_times_every_image_tower_product_on_both_sides(tmp_path):
    result = run_script("encode", "--model", "ViT-Tiny-8", "--images", "2", "--towers", "image", "--gemms", *TINY,
                        tmp_path=tmp_path)
    gemms = result["gemms"]
    # ViT-Tiny-8: 4 layers of q/k/v/out, fc, proj and two attention products; patch embedding; projection.
    assert [row["count"] for row in gemms["rows"]] == [1, 16, 4, 4, 4, 4, 1]
    for row in gemms["rows"]:
        assert_timed(row)
        assert row["gflop_per_call"] > 0
    for side in ("bioclip_jax", "open_clip"):
        assert gemms["totals"][side]["min_s"] > 0 and gemms["totals"][side]["median_s"] > 0
    assert gemms["ceiling"]["ratio_of_medians"] > 0  # the image tower was timed, so the ceiling exists
    assert gemms["xla_flags"] == "(default: YNNPACK)"


def test_train_step_runs_both_sides_on_identical_steps(tmp_path):
    result = run_script("train_step", "--model", "ViT-Tiny-8", "--batch", "4", *TINY, tmp_path=tmp_path)
    (row,) = result["rows"]
    assert_timed(row)
    losses = row["losses"]
    assert len(losses["bioclip_jax"]) == len(losses["open_clip"]) == 2  # warm-up + timed step
    # Same weights, batch, loss and optimiser: the two frameworks must follow the same trajectory.
    assert losses["bioclip_jax"] == pytest.approx(losses["open_clip"], rel=1e-3)
    assert row["bioclip_jax"]["mfu_best"] is None  # no known CPU peak, so no made-up MFU


def test_train_step_memory_table_has_every_batch(tmp_path):
    result = run_script("train_step", "--memory", "--memory-batches", "64", *TINY, tmp_path=tmp_path)
    fixed = result["fixed_devices"]
    assert [r["global_batch"] for r in fixed] == [64]
    for r in fixed:
        assert r["loss_temp_per_device"] > 0 and r["step"]["arguments"] > 0
    # The sharded loss holds a [B/8, B] block per device, the dense one [B, B] on one device.
    assert fixed[-1]["loss_temp_per_device"] < fixed[-1]["dense_loss_temp_one_device"]
    assert [r["devices"] for r in result["fixed_rows_per_device"]] == [1, 2, 4, 8]
    # The same batch as 4 micro-batches with global negatives needs less temporary memory than one step.
    accumulated = result["accumulated"]
    assert [r["global_batch"] for r in accumulated] == [64]
    assert all(r["accumulated_step"]["temp"] < r["full_step"]["temp"] for r in accumulated)


def test_data_compares_both_loaders_and_feeds_a_step(tmp_path):
    result = run_script("data", "--samples", "48", "--num-shards", "2", "--batch", "8", "--batches", "4",
                        "--drain", "4", "--workers", "1", "--feed", "--feed-model", "ViT-Tiny-8", *TINY,
                        tmp_path=tmp_path)
    loader = result["loader"]
    assert_timed(loader)
    assert loader["bioclip_jax"]["items_per_call"] == 32
    for side in sides(loader):
        assert len(side["cpu_seconds"]) == 1 and side["cpu_seconds"][0] >= 0
        # Clock ticks (no schedstat) can read 0 for a fast call: then the figure is absent, never made up.
        per_cpu = side["images_per_cpu_second"]
        assert per_cpu > 0 if result["cpu_clock"] == "schedstat" else per_cpu is None or per_cpu > 0
    assert_timed(result["feed"], repeats=2)
    latency = result["read_latency"]
    assert_timed(latency)
    assert latency["sides"] == ["5 ms reads", "no latency"] and latency["target"] == 0.8
    if len(os.sched_getaffinity(0)) >= 2:
        assert_timed(result["cores"])
        assert result["cores"]["sides"] == ["2 cores", "1 core"] and result["cores"]["target"] == 1.8
    else:
        assert result["cores"] is None
