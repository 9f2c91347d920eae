"""The training loop: data -> jitted step -> metrics, checkpoints, periodic zero-shot eval.

`train(config, workdir)` resumes automatically from the newest checkpoint in WORKDIR that
reads cleanly, data order included, and refuses to resume under a changed config (see
`run_identity`). It stops cleanly (with a checkpoint) at `stop_after` steps, on SIGTERM or
Ctrl-C, or when JAX reports a preemption (see `stopping`); a stop is reported as
`stopped` in the result, and the job then exits with `exit_codes.STOPPED`, not 0.
WORKDIR may be local or gs://. Nothing here blocks the host on the devices every step:
processes agree on stopping through JAX's preemption sync point (no communication until
a notice) and at logging steps, where they exchange counters anyway. The host runs
ahead of the devices: the next batches are placed on them while a step runs (`prefetch`;
a checkpoint saves the data position of the step it holds, not of the prefetched
batches), and a logging step's metrics are read only after the next step is dispatched
(`metrics.OneStepLate`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from bioclip_jax import paths
from bioclip_jax.compilation_cache import enable_compilation_cache
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.checkpoint.model_dir import CONFIG_JSON
from bioclip_jax.data.pipeline import SKIP_REASONS, SkipBudget, make_train_dataset, read_options
from bioclip_jax.data.replay import (PROJECTOR_KEY, REPLAY_KEYS, REPLAY_PROJECTOR_KEY, ReplayMixer,
                                     make_replay_dataset, replay_enabled)
from bioclip_jax.models.clip import sample_params
from bioclip_jax.models.config import to_open_clip
from bioclip_jax.parallel import sharding as sharding_lib
from bioclip_jax.parallel.mesh import make_mesh
from bioclip_jax.pretrained import load_source
from bioclip_jax.tokenizer import get_tokenizer
from bioclip_jax.train import run_identity
from bioclip_jax.train import state as state_lib
from bioclip_jax.train.checkpointing import TrainCheckpointer
from bioclip_jax.train.metrics import MetricsWriter, OneStepLate, step_record
from bioclip_jax.train.optimizer import make_schedule
from bioclip_jax.train.prefetch import DevicePrefetcher
from bioclip_jax.train.step import device_peak_tflops, make_train_step, model_flops_per_pair, pairs_per_step
from bioclip_jax.train.stopping import StopSignals, StopVote
from bioclip_jax.train.workdir import check_workdir
from bioclip_jax.transforms import PreprocessConfig

log = logging.getLogger(__name__)

EvalFn = Callable[..., dict]  # (model, step, mesh) -> metrics


def initial_params(config: ml_collections.ConfigDict) -> tuple[dict, PreprocessConfig]:
    """Host (numpy) parameters to start from: `config.init` (any pretrained source) or a seeded random init."""
    arch = state_lib.train_architecture(config)
    if config.init:
        loaded = load_source(config.init, config.model.name)
        if dataclasses.replace(loaded.config, init_logit_bias=None) != dataclasses.replace(arch, init_logit_bias=None):
            raise ValueError(f"config.init={config.init} holds a different architecture than "
                             f"config.model.name={config.model.name}")
        params, preprocess = dict(loaded.params), loaded.preprocess
        if arch.init_logit_bias is not None and ("logit_bias",) not in params:
            params[("logit_bias",)] = np.asarray(arch.init_logit_bias, np.float32)
    else:
        params = sample_params(arch, seed=config.seed)
        preprocess = PreprocessConfig(size=arch.vision.image_size)
    flat = {model_dir.path_to_key(p): np.asarray(v) for p, v in params.items()}
    if config.loss.kind == "sigmoid" and not config.init:
        flat["logit_scale"] = np.asarray(math.log(10.0), np.float32)  # SigLIP's initial temperature
    if replay_enabled(config):  # the replay projector starts as the model's own projection
        flat.setdefault(REPLAY_PROJECTOR_KEY, flat[PROJECTOR_KEY].copy())
    else:  # started from a replay run's checkpoint: its replay projector has no use here
        flat.pop(REPLAY_PROJECTOR_KEY, None)
    return flat, preprocess


@dataclasses.dataclass
class _Run:
    """What a run holds from set-up to finish."""
    config: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Any
    skeleton: Any
    layout: state_lib.StateLayout
    schedule: Any
    arch: Any
    data: Any  # this process's batches (train_iterator)
    skipped: "_SkipCount"
    checkpointer: TrainCheckpointer
    writer: MetricsWriter
    eval_fn: EvalFn | None
    initial: tuple[dict, PreprocessConfig] | None  # a first run's weights, loaded before the workdir is written to


def train(config: ml_collections.ConfigDict, workdir, stop_after: int | None = None,
          eval_fn: EvalFn | None = None, allow_config_change: bool = False, allow_fresh_start: bool = False) -> dict:
    """Runs (or resumes) training; returns the last logged metrics, with "stopped" set on an early stop."""
    run = _set_up(config, epath.Path(workdir), eval_fn)
    start, state, preprocess = _restore_or_start(run, allow_config_change, allow_fresh_start)
    step_fn = make_train_step(config, run.skeleton, run.layout, run.mesh, run.schedule, preprocess.mean,
                              preprocess.std)
    end = config.total_steps if stop_after is None else min(stop_after, config.total_steps)
    _log0(_startup_summary(config, run.mesh, run.layout, run.workdir, start, end))
    to_record = _step_record_fn(run)
    step, stopped_by = start, None
    with StopSignals() as signals, _closed_at_exit(run.data), \
            DevicePrefetcher(run.data, functools.partial(to_devices, mesh=run.mesh),
                             config.data.prefetch_to_device) as batches:
        vote = StopVote(signals)
        logged = OneStepLate(run.writer, share=vote.exchange, to_record=to_record,
                             diverged_hint=run.checkpointer.last_good_message, start_step=start)
        while step < end and stopped_by is None:
            run.checkpointer.check_for_errors()  # a failed background save stops the run at once
            batch = run.skipped.counted(next(batches))
            if step == start:
                _log0("compiling the train step (the first step takes longer) ...")
            state, metrics = step_fn(state, batch.device)
            step += 1
            logged.read()  # the previous logging step: done or nearly, this one is queued
            if step % config.log_every_steps == 0 or step == end:
                logged.hold(step, metrics, run.skipped.total)
            evaluating = _periodic_eval_due(run, step, end)
            preempted = run.checkpointer.reached_preemption(step)
            stopping = preempted or vote.requested
            if evaluating or stopping or step == end or run.checkpointer.manager.should_save(step):
                logged.read()  # the host waits for this step here anyway
                stopping = preempted or vote.requested  # the read may bring another process's vote
            if evaluating:
                _periodic_eval(run, logged, state, step)
            stopped_by = _stop_reason(preempted, vote) if stopping else None
            _checkpoint(run, step, state, batch, force=stopping or step == end)
    return _finish(run, state, step, stopped_by, logged.last)


def _set_up(config: ml_collections.ConfigDict, workdir: epath.Path, eval_fn: EvalFn | None) -> _Run:
    """The mesh, state layout, data and workdir writers of a run; a first run's initial weights."""
    if not config.data.train_shards:
        raise ValueError("config.data.train_shards is empty: give the training shards "
                         "(e.g. --config.data.train_shards=/data/train/shard-{000000..000159}.tar)")
    check_workdir(workdir)
    enable_compilation_cache(config.compilation_cache_dir)  # before the first compile: a requeue reuses it
    devices = jax.devices()[:config.mesh.num_devices] if config.mesh.num_devices else None
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
    sharding_lib.check_batch_layout(mesh)
    skeleton = state_lib.model_skeleton(config)
    layout = state_lib.state_layout(config, skeleton, mesh)
    schedule = make_schedule(config, state_lib.optimizer_updates(config))
    arch = state_lib.train_architecture(config)
    data = train_iterator(config, arch)
    skipped = _SkipCount(config)
    # A first run loads its initial weights before it creates anything in the workdir: a source
    # that cannot be read (a missing hub file, say) leaves no empty checkpoints/ or tensorboard/.
    first_run = not (workdir / model_dir.CHECKPOINTS_DIR).exists()
    initial = initial_params(config) if first_run else None
    checkpointer = TrainCheckpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                                     config.checkpoint.async_save)
    writer = MetricsWriter(workdir, config.total_steps)
    return _Run(config, workdir, mesh, skeleton, layout, schedule, arch, data, skipped, checkpointer, writer,
                eval_fn, initial)


def _restore_or_start(run: _Run, allow_config_change: bool, allow_fresh_start: bool
                      ) -> tuple[int, dict, PreprocessConfig]:
    """(first step, train state, preprocessing): the latest good checkpoint's, else the initial weights'.

    A resume checks the config against the run's own (`run_identity`); a first start records
    the model and the config in the workdir."""
    config, workdir = run.config, run.workdir
    changes = (_config_changes(workdir, config, allow_config_change)
               if run.checkpointer.latest_step() is not None else [])
    restored = run.checkpointer.restore_latest_good(run.layout, run.data, allow_fresh_start)
    if restored is not None:
        start, state = restored
        if changes and jax.process_index() == 0:
            run_identity.record_config_change(workdir, config, changes, start)
        meta = model_dir.read_model_json(workdir)
        preprocess = PreprocessConfig.from_open_clip(meta["preprocess_cfg"], run.arch.vision.image_size)
        if jax.process_index() == 0 and meta["model_cfg"] != to_open_clip(run.arch):  # an accepted model change
            model_dir.write_model_json(workdir, to_open_clip(run.arch), meta["preprocess_cfg"])
        _log0(f"resumed from step {start} in {run.checkpointer.directory}")
    else:
        params, preprocess = run.initial or initial_params(config)
        state = state_lib.initial_state(run.layout, params)
        start = 0
        if jax.process_index() == 0:
            model_dir.write_model_json(workdir, to_open_clip(run.arch), preprocess.to_open_clip())
            paths.write_atomically(workdir / CONFIG_JSON, config.to_json_best_effort(indent=2))
    run.writer.drop_after(start)  # the steps after `start` (all of them on a fresh start) are logged again
    return start, state, preprocess


class _SkipCount:
    """Counts each batch's unusable samples: per reason for the log, and against the run's budget."""

    def __init__(self, config: ml_collections.ConfigDict):
        self.budget = SkipBudget(config.data.max_bad_fraction, config.data.train_shards)
        self.samples_per_batch = (config.data.batch_size + config.data.replay_per_batch) // jax.process_count()
        self.total = np.zeros(len(SKIP_REASONS), np.int64)

    def counted(self, batch):
        self.budget.update(self.samples_per_batch, batch.host["skipped"], batch.host["last_bad_shard"])
        self.total += np.asarray(batch.host["skipped"], np.int64)
        return batch


def _step_record_fn(run: _Run) -> Callable[..., dict]:
    """(metrics, seconds per step, skipped) -> a logging step's record, with throughput and MFU."""
    config = run.config
    flops_per_step = model_flops_per_pair(run.arch, config.data.text_tokens or None) * pairs_per_step(config)
    return functools.partial(step_record, batch_size=pairs_per_step(config), flops_per_step=flops_per_step,
                             peak_tflops=device_peak_tflops(config.device_peak_tflops))


def _periodic_eval_due(run: _Run, step: int, end: int) -> bool:
    """An eval every eval.every_steps; the one at the end of the schedule is the final one (`_finish`)."""
    every = run.config.eval.every_steps
    return run.eval_fn is not None and bool(every) and step % every == 0 and step != end


def _periodic_eval(run: _Run, logged: OneStepLate, state: dict, step: int) -> None:
    run.writer.write(step, run.eval_fn(run.skeleton.merge(state["params"]), step, run.mesh))
    logged.restart_window(step)


def _stop_reason(preempted: bool, vote: StopVote) -> str:
    if preempted:
        return "a preemption notice"
    return vote.signals.reason or "a signal on another process"


def _checkpoint(run: _Run, step: int, state: dict, batch, force: bool) -> None:
    """Saves at the checkpoint interval, or now with `force`; the batch's data position goes with it."""
    if run.checkpointer.save(step, state, batch.data_state, force=force):
        _log0(f"saving checkpoint step {step} to {run.checkpointer.directory}")


def _finish(run: _Run, state: dict, step: int, stopped_by: str | None, last: dict) -> dict:
    """Waits for the last checkpoint; after the whole schedule, the final held-out evaluation."""
    run.checkpointer.close()
    if stopped_by is not None and step < run.config.total_steps:
        _log0(f"stopped by {stopped_by}: saved step {step} in {run.checkpointer.directory}; "
              f"rerun the same command to resume")
        run.writer.close()
        return {**last, "stopped": True}
    if run.eval_fn is not None and step == run.config.total_steps:
        result = run.eval_fn(run.skeleton.merge(state["params"]), step, run.mesh)
        run.writer.write(step, result)
        last = {**last, **result}
    run.writer.close()
    return last



def _config_changes(workdir: epath.Path, config: ml_collections.ConfigDict, allow_change: bool) -> list:
    """How the config differs from the run's saved one; a refused difference raises ValueError."""
    saved_path = paths.uncached(workdir / CONFIG_JSON)
    if not saved_path.exists():
        return []
    return run_identity.check_resumed_config(paths.read_json(saved_path), config, allow_change)


def _startup_summary(config: ml_collections.ConfigDict, mesh, layout: state_lib.StateLayout, workdir,
                     start: int, end: int) -> str:
    """What is about to run, in a few lines, before the first (slow, compiling) step."""
    parameters = sum(int(np.prod(a.shape)) for a in layout.abstract["params"].values())
    batch = config.data.batch_size
    shards = sharding_lib.batch_shard_count(mesh)
    return "\n".join([
        f"model {config.model.name}: {parameters / 1e6:.1f}M parameters, {config.dtype} compute",
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} process(es); "
        f"mesh {dict(mesh.shape)}",
        f"batch: {batch} global, {batch // jax.process_count()} per process, {batch // shards} per batch shard",
        f"steps {start} -> {end} of {config.total_steps}; data {config.data.train_shards}",
        f"workdir {workdir}",
    ])


def _train_tokenizer(config: ml_collections.ConfigDict, arch) -> functools.partial:
    length = config.data.text_tokens or arch.text.context_length
    if not 2 <= length <= arch.text.context_length:
        raise ValueError(f"config.data.text_tokens={length} must be in [2, {arch.text.context_length}]")
    return functools.partial(get_tokenizer(config.model.name), context_length=length)


@contextlib.contextmanager
def _closed_at_exit(data_iterator):
    """Closes the data iterator however the loop ends (a finished run, a stop, an error): its
    Grain worker processes end and their shared memory is freed. Entered before the prefetcher,
    so it closes after the prefetch thread has stopped drawing from it."""
    try:
        yield data_iterator
    finally:
        if hasattr(data_iterator, "close"):
            data_iterator.close()


def train_iterator(config: ml_collections.ConfigDict, arch):
    """This process's training batches, as the loop reads them: the main stream, with BioCLIP 2's
    replay pairs mixed in when the config asks for them."""
    batches = iter(train_dataset(config, arch))
    if not replay_enabled(config):
        return batches
    replay = make_replay_dataset(config, tokenizer=_train_tokenizer(config, arch), image_size=arch.vision.image_size,
                                 process_index=jax.process_index(), process_count=jax.process_count())
    return ReplayMixer(batches, iter(replay))


def train_dataset(config: ml_collections.ConfigDict, arch):
    """This process's main training batches (Grain dataset; `iter` it)."""
    return make_train_dataset(
        config.data.train_shards, global_batch_size=config.data.batch_size, seed=config.seed,
        text_type=config.data.text_type, tokenizer=_train_tokenizer(config, arch),
        image_size=arch.vision.image_size, process_index=jax.process_index(),
        process_count=jax.process_count(), **read_options(config.data))


def to_devices(host_batch: dict, mesh) -> dict:
    """The step's inputs as global arrays; the counters stay on the host."""
    return sharding_lib.host_batch_to_global(
        {k: host_batch[k] for k in ("image", "tokens", *REPLAY_KEYS) if k in host_batch}, mesh)


def _log0(message: str) -> None:
    if jax.process_index() == 0:
        log.info(message)

