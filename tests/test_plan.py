"""The memory/FLOPs planner: compiled-executable analysis on simulated devices, batch search, CLI."""

import json
import os
import subprocess
import sys

import pytest

from bioclip_jax.cli import plan as plan_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "synthetic_tiny.py") + ":smoke"


@pytest.fixture(scope="module")
def plans():
    config = plan_cli.load_train_config(TINY)
    return {name: plan_cli.plan(config, plan_cli.parse_mesh(mesh), devices=8)
            for name, mesh in (("data", "data=8"), ("fsdp", "fsdp=8"))}


def _state(result) -> int:
    return result["per_device"]["param_bytes"] + result["per_device"]["opt_state_bytes"]


def test_fsdp_over_8_devices_cuts_parameter_and_optimizer_memory_8x(plans):
    ratio = _state(plans["data"]) / _state(plans["fsdp"])
    assert 7.0 <= ratio <= 8.0 + 1e-6, ratio  # a few small vectors stay replicated
    assert plans["fsdp"]["per_device"]["peak_bytes"] < plans["data"]["per_device"]["peak_bytes"]


def test_fsdp_keeps_each_devices_activations_at_its_own_rows():
    # Activations are pinned to the batch sharding. Without the pins, XLA kept them split like
    # the fsdp-sharded weights they came from: 6.3x the memory per sample of data parallelism.
    config = plan_cli.load_train_config(TINY)

    def per_sample(mesh):
        temp = [plan_cli.plan(config, plan_cli.parse_mesh(mesh), devices=8, per_device_batch=batch)
                ["per_device"]["temp_bytes"] for batch in (16, 32)]
        return (temp[1] - temp[0]) / 16

    assert per_sample("fsdp=8") <= 1.1 * per_sample("data=8")


def test_memory_split_matches_the_executables_arguments(plans):
    for result in plans.values():
        per = result["per_device"]
        ours = per["param_bytes"] + per["opt_state_bytes"] + per["batch_bytes"]
        assert abs(per["argument_bytes"] - ours) <= 64, result["mesh"]  # + the step counter
        assert per["alias_bytes"] >= per["param_bytes"] + per["opt_state_bytes"]  # state is donated
        assert per["temp_bytes"] > 0


def test_flops_are_per_device_and_near_the_analytic_count(plans):
    per = plans["data"]["per_device"]
    assert per["model_flops"] == pytest.approx(plans["data"]["model_flops_per_pair"] * 16 / 8)
    assert 0.8 <= per["flops"] / per["model_flops"] <= 2.0


@pytest.mark.parametrize("fixed, per_sample, quadratic, start", [
    (2e9, 5e7, 0.0, 1), (2e9, 5e7, 0.0, 256), (5e9, 3e6, 40.0, 32), (1e9, 7e7, 1e3, 4),
])
def test_batch_search_finds_the_largest_fit_in_few_compiles(fixed, per_sample, quadratic, start):
    capacity = 80_000_000_000
    calls = []

    def peak(batch):
        calls.append(batch)
        return int(fixed + per_sample * batch + quadratic * batch * batch)

    truth = _largest(lambda b: fixed + per_sample * b + quadratic * b * b, capacity)
    found = plan_cli.largest_fitting_batch(peak, capacity, start=start, max_evaluations=8)
    assert truth * 0.96 <= found.fits <= truth
    assert found.too_big is None or found.too_big > truth
    assert len(set(calls)) == found.evaluations <= 6


def _largest(memory, capacity) -> int:
    lo, hi = 0, 1
    while memory(hi) <= capacity:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory(mid) <= capacity else (lo, mid)
    return lo


@pytest.mark.parametrize("start", [1, 8])
def test_batch_search_reports_zero_when_the_state_alone_does_not_fit(start):
    found = plan_cli.largest_fitting_batch(lambda b: 10**12 + b, 10**9, start=start)
    assert found.fits == 0 and found.too_big == 1


def test_cli_prints_the_plan_as_json(plans, capsys):
    assert plan_cli.main([f"--config={TINY}", "--devices", "8", "--mesh", "fsdp=8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["per_device"] == plans["fsdp"]["per_device"]
    assert result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and result["global_batch"] == 16


@pytest.mark.slow
def test_cli_searches_the_batch_for_a_memory_budget(capsys):
    """Slow variant of the fake-memory search tests: each step of the search is a real compile."""
    code = plan_cli.main([f"--config={TINY}", "--devices", "8", "--mesh", "fsdp=8", "--device-memory", "200MB",
                          "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    largest = result["largest_batch"]
    assert largest["per_device"] >= result["per_device_batch"]
    assert largest["first_too_big"] == largest["per_device"] + 1
    assert 0 < largest["per_sample_bytes"] < 200e6
    assert result["compiles"] <= 8


def test_devices_are_simulated_when_jax_has_not_started():
    code = ("from bioclip_jax.cli.plan import simulate_cpu_devices; simulate_cpu_devices(3); "
            "import jax; print(jax.device_count(), jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["3", "cpu"], result.stderr


@pytest.mark.slow
def test_cli_in_a_fresh_process_simulates_the_devices_it_is_asked_for():
    """Slow variant of the test above: the registered `plan` command end to end in its own process."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run([sys.executable, "-m", "bioclip_jax.cli.main", "plan", f"--config={TINY}",
                             "--devices", "2", "--mesh", "fsdp=2", "--peak-tflops", "312"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "on 2 cpu devices, mesh data=1 x fsdp=2 x tensor=1" in result.stdout
    for row in ("parameters", "optimiser state", "temporaries", "peak", "FLOPs per step", "pairs/s per device"):
        assert row in result.stdout


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=two"], "axis=size"),
    (["--mesh", "pipeline=2"], "axis=size"),
    (["--device-memory", "80 parsecs"], "memory size"),
    (["--config.optimizer.lrr=1"], "unknown config field 'optimizer.lrr'"),
    (["--devices", "64"], "fresh process"),
    (["--mesh", "fsdp=3"], "does not divide"),
])
def test_bad_input_is_one_clear_line(argv, message, capsys):
    import jax

    jax.devices()  # jax already runs with the session's 8 devices, whichever test came first
    code = plan_cli.main([f"--config={TINY}", *argv])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("error:") and message in error and error.count("\n") == 1


def test_memory_sizes_read_decimal_and_binary_units():
    assert plan_cli.parse_bytes("80GB") == 80 * 10**9
    assert plan_cli.parse_bytes("16GiB") == 16 * 2**30
    assert plan_cli.parse_bytes("1.5e9") == 1_500_000_000


class _FakeCompiler:
    """Memory without compiling: 1 GB of state + 100 MB per sample of a micro-batch, + 500 MB when accumulating."""

    def __init__(self, config, mesh):
        from bioclip_jax.train.optimizer import accumulation
        self.micro_batches = accumulation(config)[0]
        self.batch_shards, self.flops_per_pair, self.compiles = mesh.size, 1.0, 0
        self.replay_per_batch, self.main_batch = config.data.replay_per_batch, config.data.batch_size

    def replay_rows(self, global_batch):
        return self.replay_per_batch * global_batch // self.main_batch

    def __call__(self, per_device_batch):
        self.compiles += 1
        temp = 100e6 * per_device_batch // self.micro_batches + (500e6 if self.micro_batches > 1 else 0)
        return plan_cli.StepPlan(per_device_batch, per_device_batch * self.batch_shards, 0, 0, 0, argument_bytes=10**9,
                                 temp_bytes=int(temp), output_bytes=0, alias_bytes=0, flops=0.0, model_flops=0.0)


def test_a_batch_that_does_not_fit_gets_the_fewest_micro_batches_that_do(monkeypatch):
    monkeypatch.setattr(plan_cli, "StepCompiler", _FakeCompiler)
    config = plan_cli.load_train_config(TINY, ["--config.data.batch_size=512"])  # 64 per device
    result = plan_cli.plan(config, plan_cli.parse_mesh("data=8"), devices=8, device_memory=3 * 10**9)
    assert result["largest_batch"]["per_device"] == 20
    assert plan_cli.fewest_microbatches(64, 20) == [4, 8, 16, 32, 64]
    assert plan_cli.fewest_microbatches(64, 20, per_device_replay=40) == [4, 8]  # replay rows split too
    assert plan_cli.fewest_microbatches(64, 20, per_device_replay=5) == []
    # 4 micro-batches of 16 would fit as a plain step, but not with the accumulator: 8 of 8 do.
    assert result["suggest"] == {"accumulate_steps": 8, "micro_batch_per_device": 8, "peak_bytes": 2_300_000_000,
                                 "fits": True}
    assert "--config.optimizer.accumulate_steps=8" in plan_cli.format_plan(result)
    fitting = plan_cli.plan(config, plan_cli.parse_mesh("data=8"), devices=8, device_memory=8 * 10**9)
    assert "suggest" not in fitting


def test_plain_plan_takes_devices_mesh_and_memory_from_the_config(capsys):
    """No --devices/--mesh/--device-memory: the config's hardware and mesh decide, with a verdict."""
    hardware = ["--config.hardware.devices=8", "--config.hardware.device_memory=1GB", "--config.mesh.fsdp=8",
                "--max-compiles", "3"]
    assert plan_cli.main([f"--config={TINY}", *hardware, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["devices"] == 8 and result["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert result["verdict"] == {"device_memory_bytes": 10**9, "memory": "1 GB per device", "fits": True}
    assert result["largest_batch"]["per_device"] >= result["per_device_batch"]
    result["verdict"] = {"device_memory_bytes": 10**6, "memory": "0.001 GB per device", "fits": False}
    text = plan_cli.format_plan(result)  # as a 1 MB device would get it
    assert "verdict (XLA:CPU estimate): the batch of 2 per device does not fit in 0.001 GB per device" in text
    assert "pessimistic" in text


def test_cpu_note_names_a_published_batch_only_for_that_runs_model(plans):
    tiny = plan_cli.format_plan(plans["data"])
    assert "pessimistic" in tiny and not any(figure in tiny for figure in ("4,096", "2,816", "1.4x", "2,884"))
    large = plan_cli.format_plan(dict(plans["data"], model="ViT-L-14"))
    assert "BioCLIP 2 trained ViT-L-14 with 2,816 pairs per 80 GB GPU" in large and "4,096" not in large


@pytest.mark.parametrize("ram, fits", [(64 * 10**9, True), (10**6, False)])
def test_plain_plan_of_a_config_without_hardware_judges_this_hosts_ram(monkeypatch, capsys, ram, fits):
    """synthetic_tiny names no accelerator: plan for the devices here, in the memory they share."""
    import jax

    monkeypatch.setattr(plan_cli, "host_memory_bytes", lambda: ram, raising=False)
    assert plan_cli.main([f"--config={TINY}", "--max-compiles", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    devices = jax.device_count()
    assert result["devices"] == devices and result["platform"] == "cpu"
    assert result["verdict"]["device_memory_bytes"] == ram // devices
    assert result["verdict"]["fits"] is fits
    line = next(line for line in plan_cli.format_plan(result).splitlines() if line.startswith("verdict"))
    assert ("fits in" if fits else "does not fit in") + " this host's RAM" in line
    assert f"for each of its {devices} CPU devices" in line


def test_replay_rows_split_with_the_batch_in_a_suggested_accumulation(monkeypatch):
    monkeypatch.setattr(plan_cli, "StepCompiler", _FakeCompiler)
    config = plan_cli.load_train_config(TINY, ["--config.data.batch_size=512", "--config.data.replay_per_batch=32"])
    result = plan_cli.plan(config, plan_cli.parse_mesh("data=8"), devices=8, device_memory=3 * 10**9)
    # 64 + 4 rows per device: 4 micro-batches is the only split of both (8 would fit, see above).
    assert result["suggest"] == {"accumulate_steps": 4, "micro_batch_per_device": 16, "peak_bytes": 3_100_000_000,
                                 "fits": False}


def test_a_suggested_accumulation_with_replay_compiles():
    """BioCLIP 2's case, tiny: the suggested step (global negatives, replay rows in every micro-batch)
    is compiled for real; the step used to refuse replay with accumulation."""
    config = plan_cli.load_train_config(TINY, ["--config.data.batch_size=64", "--config.data.replay_per_batch=16"])
    mesh = plan_cli._mesh_for(config, plan_cli.parse_mesh("data=8"), 8)
    compilers = []
    hint = plan_cli.suggest_accumulation(config, mesh, 8, 2, fits=4, device_memory=10**12, compilers=compilers)
    assert hint["accumulate_steps"] == 2 and hint["fits"] and hint["peak_bytes"] > 0
    assert compilers[-1].compiles == 1


@pytest.mark.parametrize("name, devices, mesh, per_device", [
    ("bioclip_vitb16", 8, (8, 1, 1), 4096),
    ("bioclip2_vitl14", 32, (4, 8, 1), 2816),
])
def test_shipped_recipes_plan_for_their_published_hardware(name, devices, mesh, per_device):
    from bioclip_jax.parallel.mesh import resolve_mesh_shape

    config = plan_cli.load_train_config(os.path.join(REPO, "configs", f"{name}.py"))
    assert plan_cli.planned_devices(None, config) == devices
    assert plan_cli.parse_bytes(config.hardware.device_memory) == 80 * 10**9
    shape = resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    assert shape == mesh and config.data.batch_size // (shape[0] * shape[1]) == per_device
    local = plan_cli.load_train_config(os.path.join(REPO, "configs", f"{name}.py:local"))
    assert plan_cli.planned_devices(None, local) is None  # the local variant plans for this machine
    assert plan_cli.planned_devices("local", config) is None and plan_cli.planned_devices("2", config) == 2
