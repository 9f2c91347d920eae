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


def test_gpu_check_cpu_path_writes_mfu_ratio_and_both_loss_trajectories(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the test session's 8 simulated devices are not the script's business
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--cpu-quick"],
                            capture_output=True, text=True, env=env, timeout=900, check=False)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    runs = json.loads((tmp_path / "summary.json").read_text())["runs"]
    assert [run["remat"] for run in runs] == ["none", "full"]
    for run in runs:
        assert run["ratio_of_medians"] > 0 and run["ratio_of_mins"] > 0
        assert run["mfu_best"] == {"bioclip_jax": None, "open_clip": None}  # a CPU has no known peak
        ours, reference = run["losses"]["bioclip_jax"], run["losses"]["open_clip"]
        assert len(ours) == len(reference) == 2  # warm-up and timed step
        assert ours == pytest.approx(reference, rel=1e-3)  # same weights, batch and optimiser
    assert runs[0]["losses"]["bioclip_jax"] == pytest.approx(runs[1]["losses"]["bioclip_jax"], rel=1e-5)
    assert {"gpu_check.log", "summary.md", "train_step_remat_none.json", "train_step_remat_full.json"} <= {
        p.name for p in tmp_path.iterdir()}


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
