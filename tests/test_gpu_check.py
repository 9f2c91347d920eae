"""The prepared GPU check runs end to end on a CPU, and MFU has a peak on every accelerator we target."""

import json
import math
import os
import subprocess
import sys
import types

import jax
import pytest

from bioclip_jax.train import step

ROOT = os.path.join(os.path.dirname(__file__), "..")

# What `jax.devices()[0].device_kind` reports on each (v5e and v6e as "lite", v5p as plain "TPU v5").
ACCELERATORS = ["TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite", "NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB",
                "NVIDIA A100 80GB PCIe", "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
                "NVIDIA H200", "NVIDIA B200"]


def test_gpu_check_cpu_path_runs_each_side_in_its_own_process_and_sums_up(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), PYTHON=sys.executable,
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices are not the script's business
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu-quick",
                             "--parts", "steps,reference"],
                            capture_output=True, text=True, env=env, timeout=1200, check=False)
    out = tmp_path / "out"
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{log[-3000:]}"
    assert {p.name for p in out.iterdir()} == {"gpu_check.log", "environment.txt", "summary.md", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    ours = {s["setting"]: s for s in summary["steps"]["settings"]}
    reference = {s["setting"]: s for s in summary["reference"]["settings"]}
    assert set(ours) == {"xla:none:8", "xla:minimal:8", "head_major:full:8"}
    assert all("images_per_s_best" in s for s in [*ours.values(), *reference.values()]), summary
    # Same weights (ours exported them, open_clip loaded them) and the same batch: the same first loss,
    # whichever remat and kernel (bf16 round-off apart).
    first = {s["losses"][0] for s in [*ours.values(), *reference.values()]}
    assert max(first) - min(first) <= 2e-2 * max(first)
    assert summary["figures"]["ratio_to_open_clip"] > 0
    assert summary["figures"]["mfu_vit_b16"] is None  # a CPU has no known peak
    # The flags part reruns the fastest of ours, named as gpu_step.py takes it.
    summary_script = os.path.join(ROOT, "benchmarks", "gpu_check_summary.py")
    best = subprocess.run([sys.executable, summary_script, "--best-setting", str(tmp_path / "gpu_check_records")],
                          capture_output=True, text=True, check=True).stdout.strip()
    fastest = max(ours.values(), key=lambda s: s["images_per_s_median"])
    assert best == f"{fastest['attention']}:{fastest['remat']}:8"
    text = (out / "summary.md").read_text()
    assert "| ViT-B/16 img/s, ours best / open_clip best (medians) |" in text and "relative difference" in text


def test_gpu_check_archive_part_times_predict_against_the_bare_tower_per_decoder_count(tmp_path):
    """Issue 21's GPU figure, on request: the same script path, on a CPU, with a tiny model."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), PYTHON=sys.executable,
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu-quick", "--parts",
                             "archive"], capture_output=True, text=True, env=env, timeout=600, check=False)
    out = tmp_path / "out"
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}\n{log[-3000:]}"
    summary = json.loads((out / "summary.json").read_text())
    figures = summary["archive"]["figures"]
    assert set(figures["ours_vs_tower"]) == {"bioclip_jax workers=1", "bioclip_jax workers=2"}
    assert summary["figures"]["predict_vs_image_tower"] == max(figures["ours_vs_tower"].values()) > 0
    assert summary["archive"]["image_size"] == [224, 224] and summary["archive"]["device"] == "cpu"
    assert "Predict over an archive (24 JPEGs of 224x224" in (out / "summary.md").read_text()


def _on_device(monkeypatch, kind: str) -> None:
    monkeypatch.setattr(jax, "devices", lambda *args: [types.SimpleNamespace(device_kind=kind)])


@pytest.mark.parametrize("kind", ACCELERATORS)
def test_every_targeted_accelerator_has_a_peak(monkeypatch, kind):
    _on_device(monkeypatch, kind)
    assert math.isfinite(step.device_peak_tflops()) and step.device_peak_tflops() > 100


def test_v5p_is_not_taken_for_v5e(monkeypatch):
    _on_device(monkeypatch, "TPU v5")
    v5p = step.device_peak_tflops()
    _on_device(monkeypatch, "TPU v5 lite")
    assert v5p > step.device_peak_tflops()


@pytest.mark.parametrize("kind", ["cpu", "TPU v4 lite", "NVIDIA GeForce RTX 4090", "NVIDIA H1000"])
def test_unknown_devices_get_no_mfu(monkeypatch, kind):
    _on_device(monkeypatch, kind)
    assert math.isnan(step.device_peak_tflops())
    assert step.device_peak_tflops(123.0) == 123.0  # a configured peak wins


def test_model_flops_count_the_text_positions_a_run_feeds():
    """A run with data.text_tokens=48 (the synthetic config) runs the text tower on 48 positions, not 77:
    counting 77 overstated its MFU."""
    from bioclip_jax.models.config import get_model_config

    arch = get_model_config("ViT-B-16")
    full, short = step.model_flops_per_pair(arch), step.model_flops_per_pair(arch, 48)
    assert step.model_flops_per_pair(arch, 77) == full
    t = arch.text
    per_position = 3 * 2 * t.layers * (4 * t.width ** 2 + 2 * t.width * t.mlp_width)  # the matmuls, not attention
    assert full - short >= per_position * (77 - 48)
    assert short > 0.85 * full  # the image tower dominates
