"""`bioclip-jax plan --config=configs/NAME.py[:ARG] [--devices N|local] [--mesh data=D,fsdp=F,tensor=T]`.

Decide the mesh before paying for a pod: this compiles the train step for the mesh
without running it (shapes only; no parameter is ever materialised) and prints, per
device, the memory of parameters, optimiser state, the input batch and XLA's
temporaries (activations kept for the backward pass, gradients, workspace) from the
compiled executable's memory analysis, the FLOPs per step, and with --device-memory
the largest per-device batch that fits (a few compiles: a linear fit, then bisection).
When the config's batch does not fit but a smaller one does, it suggests
`optimizer.accumulate_steps=k`: the same batch, with all its negatives, as k micro-batches
(checked by compiling that step too).

With no flags the config says what to plan for: its mesh, `hardware.devices` (simulated
as CPU devices) and `hardware.device_memory` (a fits / does not fit verdict and the
largest per-device batch). A config that names no accelerator is planned for the devices
present and judged against their memory: this host's RAM (shared by its CPU devices), or
an accelerator's own memory. --devices N simulates N CPU devices, so a laptop plans a
256-chip pod. XLA:CPU keeps more activations alive than TPU and GPU compilers (see
CPU_ESTIMATE_NOTE): read its batch limits as pessimistic, or run with `--devices local`
on one accelerator host to get that backend's own analysis for its local devices.

jax, and every bioclip_jax module that imports it, is imported inside the functions: the
simulated CPU devices must be set (simulate_cpu_devices) before jax starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable

from bioclip_jax.cli.common import ArgumentParser, load_train_config

MESH_AXES = ("data", "fsdp", "tensor")  # the same names as bioclip_jax.parallel.mesh (imports jax)
UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


# ----------------------------------------------------------------------------- parsing (no jax here)


def parse_bytes(text: str) -> int:
    """'80GB', '16GiB', '512MB', '1e9' -> bytes (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).upper() not in UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 80GB, 16GiB or 512MB")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' -> {'data': 2, 'fsdp': 4, 'tensor': 1}; an axis not named takes the rest (data)."""
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name.strip() not in MESH_AXES or not re.fullmatch(r"-?\d+", value.strip()):
            raise ValueError(f"--mesh {text!r}: write axis=size pairs over {', '.join(MESH_AXES)}, e.g. data=2,fsdp=4")
        sizes[name.strip()] = int(value)
    return sizes


CPU_ESTIMATE_NOTE = (
    "XLA:CPU compiled this plan; it keeps more activations alive than the GPU and TPU compilers, so its "
    "batch limits are pessimistic (docs/scaling.md compares them with the published runs). Parameter and "
    "optimiser-state figures are exact. For the accelerator's own figures run "
    "`bioclip-jax plan --devices local` on one accelerator host.")
# What the published runs trained per 80 GB GPU, by model: a yardstick for a plan of that model.
PUBLISHED_BATCHES = {"ViT-B-16-quickgelu": ("BioCLIP", 4096), "ViT-L-14": ("BioCLIP 2", 2816)}


def cpu_estimate_note(model: str) -> str:
    """The note under a CPU plan, with the published per-GPU batch when a published run used this model."""
    if model not in PUBLISHED_BATCHES:
        return CPU_ESTIMATE_NOTE
    run, batch = PUBLISHED_BATCHES[model]
    return f"{CPU_ESTIMATE_NOTE} For scale: {run} trained {model} with {batch:,} pairs per 80 GB GPU."


def planned_devices(flag: str | None, config) -> int | None:
    """How many CPU devices to simulate (None: the devices present): --devices N, 'local', or the
    config's hardware.devices."""
    if flag is None:
        return int(config.hardware.devices) or None
    if flag == "local":
        return None
    if not re.fullmatch(r"\d+", flag) or int(flag) < 1:
        raise ValueError(f"--devices must be a positive number or 'local', got {flag!r}")
    return int(flag)


# XLA:CPU's default scheduler orders work for concurrency, which keeps activations alive that
# remat means to drop; TPU and GPU compilers schedule with memory in mind, and so should a plan.
MEMORY_FRIENDLY_CPU_FLAGS = ("--xla_cpu_enable_concurrency_optimized_scheduler=false",)


def simulate_cpu_devices(count: int) -> None:
    """Makes jax start with `count` CPU devices; must run before jax initialises a backend."""
    if "jax" in sys.modules:
        from jax._src import xla_bridge  # noqa: PLC0415
        if xla_bridge.backends_are_initialized():
            return  # plan() checks that enough CPU devices exist
        import jax  # noqa: PLC0415
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", count)
    else:
        os.environ["JAX_PLATFORMS"] = "cpu"
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).split()
    flags += [f for f in MEMORY_FRIENDLY_CPU_FLAGS if f.split("=")[0] not in " ".join(flags)]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


# ----------------------------------------------------------------------------- one compile


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Per-device bytes and FLOPs of one compiled train step."""

    per_device_batch: int
    global_batch: int
    param_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    argument_bytes: int   # XLA: everything passed in (parameters, optimiser state, batch)
    temp_bytes: int       # XLA: activations, gradients, workspace
    output_bytes: int
    alias_bytes: int      # outputs written in place of donated inputs
    flops: float          # XLA's count of the whole step (unrolled, recomputation included) / devices
    model_flops: float    # analytic model FLOPs of the step, divided over the devices

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def state_bytes(self) -> int:
        return self.param_bytes + self.opt_state_bytes


def _shard_bytes(abstract_tree, sharding_tree) -> int:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    leaves = jax.tree.leaves(abstract_tree)
    shardings = jax.tree.leaves(sharding_tree)
    return int(sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                   for a, s in zip(leaves, shardings, strict=True)))


class StepCompiler:
    """Compiles the train step of `config` on `mesh` for any per-device batch (memoised)."""

    def __init__(self, config, mesh):
        from bioclip_jax.models.config import get_model_config  # noqa: PLC0415
        from bioclip_jax.parallel import sharding as sharding_lib  # noqa: PLC0415
        from bioclip_jax.train import state as state_lib  # noqa: PLC0415
        from bioclip_jax.train.optimizer import make_schedule  # noqa: PLC0415
        from bioclip_jax.train.step import make_train_step, model_flops_per_pair  # noqa: PLC0415

        self.config, self.mesh = config, mesh
        self.arch = get_model_config(config.model.name)
        skeleton = state_lib.model_skeleton(config)
        self.layout = state_lib.state_layout(config, skeleton, mesh)
        self.step = make_train_step(config, skeleton, self.layout, mesh, make_schedule(config, config.total_steps))
        # XLA's cost analysis counts a loop body once, so FLOPs are counted on the same step with
        # the blocks unrolled; it is only traced and lowered (cheap), never compiled.
        # Accumulation's micro-batch loop is a loop too: the count is of the batch as one step (it
        # leaves out accumulation's extra forward pass).
        unrolled = without_accumulation(config)
        unrolled.scan_layers = False
        self.counting_step = make_train_step(unrolled, state_lib.model_skeleton(unrolled), self.layout, mesh,
                                             make_schedule(unrolled, unrolled.total_steps))
        self.batch_shards = math.prod(mesh.shape[a] for a in sharding_lib.batch_axes(mesh))
        self.flops_per_pair = model_flops_per_pair(self.arch)
        self.compiles = 0
        self._plans: dict[int, StepPlan] = {}

    def __call__(self, per_device_batch: int) -> StepPlan:
        if per_device_batch not in self._plans:
            self._plans[per_device_batch] = self._compile(per_device_batch)
        return self._plans[per_device_batch]

    def _compile(self, per_device_batch: int) -> StepPlan:
        import jax  # noqa: PLC0415
        import jax.numpy as jnp  # noqa: PLC0415
        from bioclip_jax.parallel import sharding as sharding_lib  # noqa: PLC0415

        global_batch = per_device_batch * self.batch_shards
        size, length = self.arch.vision.image_size, self.arch.text.context_length
        batch = {"image": jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.uint8),
                 "tokens": jax.ShapeDtypeStruct((global_batch, length), jnp.int32)}
        replay = self.replay_rows(global_batch)
        if replay:
            batch["replay_image"] = jax.ShapeDtypeStruct((replay, size, size, 3), jnp.uint8)
            batch["replay_tokens"] = jax.ShapeDtypeStruct((replay, length), jnp.int32)
        compiled = self.step.lower(self.layout.abstract, batch).compile()
        self.compiles += 1
        memory = compiled.memory_analysis()
        cost = self.counting_step.lower(self.layout.abstract, batch).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        batch_sharding = sharding_lib.batch_sharding(self.mesh)
        shardings = self.layout.shardings
        return StepPlan(
            per_device_batch=per_device_batch, global_batch=global_batch,
            param_bytes=_shard_bytes(self.layout.abstract["params"], shardings["params"]),
            opt_state_bytes=_shard_bytes(self.layout.abstract["opt_state"], shardings["opt_state"]),
            batch_bytes=_shard_bytes(batch, {k: batch_sharding for k in batch}),
            argument_bytes=int(memory.argument_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
            output_bytes=int(memory.output_size_in_bytes), alias_bytes=int(memory.alias_size_in_bytes),
            flops=float((cost or {}).get("flops", float("nan"))) / self.mesh.size,
            model_flops=self.flops_per_pair * (global_batch + replay) / self.mesh.size)

    def replay_rows(self, global_batch: int) -> int:
        """Replay pairs beside a main batch: the config's share of them, whole rows on every batch shard."""
        count, main = int(self.config.data.replay_per_batch), int(self.config.data.batch_size)
        if count <= 0:
            return 0
        per_shard = max(1, count * global_batch // (main * self.batch_shards))
        return per_shard * self.batch_shards


def without_accumulation(config):
    """A copy of `config` whose step takes the whole batch at once (no micro-batches inside the step)."""
    from bioclip_jax.train.optimizer import accumulation  # noqa: PLC0415

    copy = config.copy_and_resolve_references()
    if accumulation(config)[1] == "global_negatives":
        copy.optimizer.accumulate_steps = 1
    return copy


# ----------------------------------------------------------------------------- largest batch


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    fits: int            # largest per-device batch known to fit (0: not even the smallest tried)
    too_big: int | None  # smallest per-device batch known not to fit
    evaluations: int
    fixed_bytes: float   # linear fit: peak = fixed + per_sample * batch
    per_sample_bytes: float


def largest_fitting_batch(peak_of: Callable[[int], int], capacity: int, start: int = 1,
                          max_evaluations: int = 8) -> BatchSearch:
    """Largest b with peak_of(b) <= capacity to within ~3%, in a few evaluations (each one a compile).

    Memory grows almost linearly with the batch (the [b, B] logits add a small quadratic
    term): a curve through the measured points nearest the limit predicts the answer, and
    an evaluation just above a fitting prediction closes the bracket. When a prediction
    fails to halve the bracket, bisection takes over.
    """
    start = max(1, int(start))
    peaks = {start: peak_of(start)}
    second = 2 * start if peaks[start] <= capacity else max(1, start // 2)
    if second not in peaks:
        peaks[second] = peak_of(second)
    previous_width = math.inf
    while len(peaks) < max_evaluations:
        lo, hi = _bracket(peaks, capacity)
        step = max(1, lo // 32)
        if hi is not None and hi - lo <= step:
            break
        width = math.inf if hi is None else hi - lo
        guess = _model_guess(peaks, capacity, lo, hi, step)
        if hi is not None and (width > previous_width / 2 or not lo < guess < hi):
            guess = _middle(lo, hi)  # the model did not halve the bracket last time: bisect
        previous_width = width
        if guess in peaks:
            break
        peaks[guess] = peak_of(guess)
    lo, hi = _bracket(peaks, capacity)
    if len(peaks) < 2:  # only batch 1 was tried, and it does not fit
        return BatchSearch(lo, hi, 1, float("nan"), float("nan"))
    (b1, p1), (b2, p2) = sorted(peaks.items(), key=lambda item: abs(item[0] - max(lo, 1)))[:2]
    per_sample = (p2 - p1) / (b2 - b1)
    return BatchSearch(lo, hi, len(peaks), p1 - per_sample * b1, per_sample)


def _bracket(peaks: dict[int, int], capacity: int) -> tuple[int, int | None]:
    lo = max((b for b, p in peaks.items() if p <= capacity), default=0)
    hi = min((b for b, p in peaks.items() if p > capacity), default=None)
    return lo, hi


def _middle(lo: int, hi: int) -> int:
    """Bisection; geometric when the bracket spans more than a factor 4."""
    return int(math.sqrt(lo * hi)) if lo and hi > 4 * lo else (lo + hi) // 2


def _model_guess(peaks: dict[int, int], capacity: int, lo: int, hi: int | None, step: int) -> int:
    """Where memory reaches the capacity on a curve through the measured points nearest the limit:
    a parabola through three (the logits add b^2), a line through two."""
    anchor = lo or hi
    nearest = sorted(peaks.items(), key=lambda item: abs(item[0] - anchor))[:3]
    guess = _crossing(sorted(nearest), capacity) if len(nearest) == 3 else None
    if guess is None and len(nearest) >= 2:
        guess = _crossing(sorted(nearest[:2]), capacity)
    if guess is None:
        guess = 2 * lo if lo else hi // 2
    if lo:
        guess = max(guess, lo + step)  # a prediction at a known fit: test just above it
    if hi is not None:
        guess = min(guess, hi - step) if lo else min(max(guess, 1), hi - 1)
    return guess


def _crossing(points: list[tuple[int, int]], capacity: int) -> int | None:
    """Largest x >= 1 where the interpolating polynomial (degree len-1 <= 2) equals capacity."""
    (x0, y0), (x1, y1) = points[0], points[1]
    slope01 = (y1 - y0) / (x1 - x0)
    curvature = 0.0
    if len(points) == 3:
        x2, y2 = points[2]
        curvature = ((y2 - y1) / (x2 - x1) - slope01) / (x2 - x0)
    # y0 + slope01 (x - x0) + curvature (x - x0)(x - x1) = capacity
    a, b = curvature, slope01 - curvature * (x0 + x1)
    c = y0 - slope01 * x0 + curvature * x0 * x1 - capacity
    if abs(a) < 1e-12 * max(abs(b), 1.0):
        return int(-c / b) if b > 0 else None
    disc = b * b - 4 * a * c
    if disc < 0:
        return None
    roots = [(-b + sign * math.sqrt(disc)) / (2 * a) for sign in (1, -1)]
    rising = [r for r in roots if r >= 1 and 2 * a * r + b > 0]  # memory must grow with the batch there
    return int(max(rising)) if rising else None


# ----------------------------------------------------------------------------- report


def _mesh_for(config, sizes: dict[str, int] | None, device_count: int | None):
    import jax  # noqa: PLC0415
    from bioclip_jax.parallel.mesh import make_mesh  # noqa: PLC0415

    devices = jax.devices()
    wanted = device_count or config.mesh.num_devices or len(devices)
    if device_count and (len(devices) < device_count or devices[0].platform != "cpu"):
        raise ValueError(f"--devices {device_count}: jax already runs here with {len(devices)} "
                         f"{devices[0].platform} devices; run `bioclip-jax plan` in a fresh process")
    if wanted > len(devices):
        raise ValueError(f"config.mesh.num_devices={wanted} but only {len(devices)} devices exist; "
                         f"pass --devices {wanted} to simulate them")
    sizes = sizes or {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}
    return make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices[:wanted])


def host_memory_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def local_device_memory(mesh) -> tuple[int, str] | None:
    """(bytes per device, what they are) for devices present: an accelerator's own limit, or for
    CPU devices this host's RAM, which they share; None when the backend does not say."""
    device = mesh.devices.flat[0]
    if device.platform == "cpu":
        ram = host_memory_bytes()
        shared = f", {ram / mesh.size / 1e9:.3g} GB for each of its {mesh.size} CPU devices" if mesh.size > 1 else ""
        return ram // mesh.size, f"this host's RAM ({ram / 1e9:.3g} GB{shared})"
    limit = (device.memory_stats() or {}).get("bytes_limit")
    return (int(limit), f"the memory of one {device.device_kind}") if limit else None


def plan(config, mesh_sizes: dict[str, int] | None = None, devices: int | None = None,
         per_device_batch: int | None = None, device_memory: int | None = None,
         max_compiles: int = 8) -> dict:
    """The plan as a plain dict (what `--json` prints).

    Without `device_memory`, a plan for the devices present (`devices` None) is judged against
    their own memory (`local_device_memory`); a plan of simulated devices gets no verdict.
    """
    mesh = _mesh_for(config, mesh_sizes, devices)
    memory_name = None
    if device_memory is None and devices is None and (local := local_device_memory(mesh)):
        device_memory, memory_name = local
    if device_memory:
        memory_name = memory_name or f"{device_memory / 1e9:g} GB per device"
    compiler = StepCompiler(config, mesh)
    if per_device_batch is None:
        if config.data.batch_size % compiler.batch_shards:
            raise ValueError(f"config.data.batch_size={config.data.batch_size} is not divisible by the "
                             f"{compiler.batch_shards} batch shards of mesh {dict(mesh.shape)}")
        per_device_batch = config.data.batch_size // compiler.batch_shards
    step = compiler(per_device_batch)
    result = {
        "model": config.model.name, "devices": int(mesh.size), "platform": mesh.devices.flat[0].platform,
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "dtype": config.dtype, "remat": config.remat,
        "per_device_batch": step.per_device_batch, "global_batch": step.global_batch,
        "per_device": {"param_bytes": step.param_bytes, "opt_state_bytes": step.opt_state_bytes,
                       "batch_bytes": step.batch_bytes, "argument_bytes": step.argument_bytes,
                       "temp_bytes": step.temp_bytes, "output_bytes": step.output_bytes,
                       "alias_bytes": step.alias_bytes, "peak_bytes": step.peak_bytes,
                       "flops": step.flops, "model_flops": step.model_flops},
        "model_flops_per_pair": compiler.flops_per_pair,
    }
    from bioclip_jax.train.optimizer import accumulation  # noqa: PLC0415

    steps, mode = accumulation(config)
    if steps > 1:
        result["accumulate"] = {"steps": steps, "mode": mode}
    compilers = [compiler]
    if device_memory:  # the largest batch one step takes at once (a micro-batch, when accumulating)
        if steps > 1 and mode == "global_negatives":
            compilers.append(StepCompiler(without_accumulation(config), mesh))
        search = largest_fitting_batch(lambda b: compilers[-1](b).peak_bytes, device_memory,
                                       start=max(1, per_device_batch // steps), max_evaluations=max_compiles)
        result["largest_batch"] = {"device_memory_bytes": int(device_memory), "per_device": search.fits,
                                   "global": search.fits * compiler.batch_shards, "first_too_big": search.too_big,
                                   "fixed_bytes": _finite(search.fixed_bytes),
                                   "per_sample_bytes": _finite(search.per_sample_bytes)}
        if mode == "global_negatives" and step.peak_bytes > device_memory and search.fits:
            replay = compiler.replay_rows(step.global_batch) // compiler.batch_shards
            suggestion = suggest_accumulation(config, mesh, per_device_batch, replay, search.fits, device_memory,
                                              compilers)
            if suggestion:
                result["suggest"] = suggestion
    if device_memory:
        result["verdict"] = {"device_memory_bytes": int(device_memory), "memory": memory_name,
                             "fits": step.peak_bytes <= device_memory}
    result["compiles"] = sum(c.compiles for c in compilers)
    return result


def fewest_microbatches(per_device_batch: int, fits: int, per_device_replay: int = 0) -> list[int]:
    """Micro-batch counts k whose micro-batch fits, fewest first: divisors of the per-device batch
    and of its replay rows (each micro-batch takes the same share of both)."""
    return [k for k in range(1, per_device_batch + 1)
            if per_device_batch % k == 0 and per_device_replay % k == 0 and per_device_batch // k <= fits]


def suggest_accumulation(config, mesh, per_device_batch: int, per_device_replay: int, fits: int,
                         device_memory: int, compilers: list, tries: int = 3) -> dict | None:
    """The smallest `optimizer.accumulate_steps` whose compiled step fits (the cached features and the
    gradient accumulator cost a little more than a plain step on one micro-batch); None when no
    count splits the batch (and its replay rows) into micro-batches that fit."""
    candidates = fewest_microbatches(per_device_batch, fits, per_device_replay)[:tries]
    if not candidates:
        return None
    for k in candidates:
        accumulated = config.copy_and_resolve_references()
        accumulated.optimizer.accumulate_steps = k
        compilers.append(StepCompiler(accumulated, mesh))
        peak = compilers[-1](per_device_batch).peak_bytes
        if peak <= device_memory:
            break
    return {"accumulate_steps": k, "micro_batch_per_device": per_device_batch // k, "peak_bytes": peak,
            "fits": peak <= device_memory}


def format_plan(result: dict, peak_tflops: float | None = None, mfu: float = 0.4) -> str:
    per = result["per_device"]
    mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"{result['model']} on {result['devices']} {result['platform']} devices, mesh {mesh}; "
             f"dtype {result['dtype']}, remat {result['remat']}",
             f"batch: {result['per_device_batch']} per device, {result['global_batch']} global"
             + (f", as {result['accumulate']['steps']} micro-batches ({result['accumulate']['mode']})"
                if "accumulate" in result else ""),
             "", "  per device"]
    rows = [("parameters", per["param_bytes"]), ("optimiser state", per["opt_state_bytes"]),
            ("batch (uint8 images, int32 tokens)", per["batch_bytes"]),
            ("temporaries (activations, grads, work)", per["temp_bytes"]),
            ("peak (in + out - donated + temporaries)", per["peak_bytes"])]
    lines += [f"  {name:<40} {_bytes(value):>11}" for name, value in rows]
    lines += ["", f"FLOPs per step per device: {_flops(per['flops'])} counted by XLA (recomputation "
                  f"included), {_flops(per['model_flops'])} model "
                  f"({_flops(result['model_flops_per_pair'])} per image-text pair)"]
    if peak_tflops:
        pairs = peak_tflops * 1e12 * mfu / result["model_flops_per_pair"]
        lines.append(f"estimate at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s: {pairs:,.0f} pairs/s per device, "
                     f"{per['model_flops'] / (peak_tflops * 1e12 * mfu):.3f} s per step")
    if "largest_batch" in result:
        found = result["largest_batch"]
        budget = result["verdict"]["memory"]
        if not found["per_device"]:
            lines.append(f"nothing fits in {budget}: a per-device batch of {found['first_too_big']} is already "
                         f"too much (shard the state with fsdp, or use smaller micro-batches)")
        else:
            limit = f" (first too big: {found['first_too_big']})" if found["first_too_big"] else ""
            growth = found["per_sample_bytes"]
            lines.append(f"largest per-device batch within {budget}: {found['per_device']} ({found['global']} "
                         f"global){limit}" + (f"; near it, memory grows by {_bytes(growth)} per sample"
                                               if growth else ""))
    if "suggest" in result:
        hint = result["suggest"]
        lines.append(f"the batch of {result['global_batch']} does not fit: --config.optimizer.accumulate_steps="
                     f"{hint['accumulate_steps']} runs it as micro-batches of {hint['micro_batch_per_device']} per "
                     f"device with all its negatives (peak {_bytes(hint['peak_bytes'])}"
                     f"{'' if hint['fits'] else ', still too much'})")
    if "verdict" in result:
        verdict = result["verdict"]
        estimate = " (XLA:CPU estimate)" if result["platform"] == "cpu" else ""
        lines.append(f"verdict{estimate}: the batch of {result['per_device_batch']} per device "
                     + ("fits in " if verdict["fits"] else "does not fit in ") + verdict["memory"]
                     + f" (peak {_bytes(per['peak_bytes'])} per device)")
    if result["platform"] == "cpu":
        lines.append(cpu_estimate_note(result["model"]))
    lines.append(f"({result['compiles']} compile{'s' * (result['compiles'] != 1)})")
    return "\n".join(lines)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _flops(value: float) -> str:
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.3g} FLOP"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax plan", description=__doc__.split("\n\n")[1],
                                     epilog="Any config field: --config.FIELD=VALUE (e.g. --config.remat=full).")
    parser.add_argument("--config", required=True, help="configs/NAME.py or configs/NAME.py:ARG")
    parser.add_argument("--devices", help="simulate this many CPU devices, or 'local' for the devices present; "
                                          "default: the config's hardware.devices (0 = local)")
    parser.add_argument("--mesh", help="axis sizes, e.g. data=4,fsdp=8 (data takes the rest when not given); "
                                       "default: the config's mesh")
    parser.add_argument("--per-device-batch", type=int, help="default: config.data.batch_size / batch shards")
    parser.add_argument("--device-memory", help="memory per device, e.g. 80GB or 16GiB: a verdict and the largest "
                                                "per-device batch that fits; default: hardware.device_memory")
    parser.add_argument("--max-compiles", type=int, default=8, help="compile budget of the batch search")
    parser.add_argument("--peak-tflops", type=float, help="device peak (bf16 dense), for a throughput estimate")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for the estimate")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_train_config(args.config, rest)
        devices = planned_devices(args.devices, config)
        if devices:
            simulate_cpu_devices(devices)  # before anything initialises jax's backend
        memory = args.device_memory or config.hardware.device_memory
        result = plan(config, parse_mesh(args.mesh) if args.mesh else None, devices, args.per_device_batch,
                      parse_bytes(memory) if memory else None, args.max_compiles)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else format_plan(result, args.peak_tflops, args.mfu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
