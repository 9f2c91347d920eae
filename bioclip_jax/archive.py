"""Runs over image archives (predict, embed): this process's slice of the inputs, less what an earlier run
with the same output already did, embedded on every local device, handed on batch by batch.

Each process takes its own share of the inputs (`ImageInputs.items(p, n)`: whole shards when there are
enough, else every n-th input from the p-th): every process lists the same inputs, so they agree on the
split without talking. Each process writes its own output part (see `outputs`); process
0 merges them once all are done. The progress bar (process 0 only) counts the inputs in a thread
beside the run, so it shows an ETA once the count is known without the run waiting for it.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
import time
from typing import Callable, Iterable, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from bioclip_jax import console
from bioclip_jax.data.image_inputs import ImageInputs
from bioclip_jax.inference import ImageEmbedder, report_skipped
from bioclip_jax.outputs.run_record import fingerprint
from bioclip_jax.sources import RANDOM

log = logging.getLogger(__name__)


class Output(Protocol):
    """What a run writes into: keys done by earlier runs, and the unreadable inputs of this one."""

    done: set[str]

    def skip(self, key: str, reason: str) -> None: ...


@dataclasses.dataclass
class RunSummary:
    """Over every process: inputs answered by this run, skipped as unreadable, done by an earlier run."""

    images: int
    skipped: int
    already_done: int
    seconds: float

    def line(self, verb: str = "classified") -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        earlier = f", {self.already_done} done by an earlier run" if self.already_done else ""
        return (f"{self.images} images {verb}, {self.skipped} skipped{earlier}; {rate:.1f} images/s, "
                f"{console.duration(self.seconds)} wall time")


def model_identity(model, seed: int) -> dict:
    """What names a model in an output's identity: its source, and for random weights (which have no
    source) their architecture and seed."""
    if model.source is not None:
        return {"model": model.source}
    return {"model": RANDOM, "architecture": fingerprint(dataclasses.asdict(model.config)), "seed": seed}


def _count_into(bar: tqdm, keys: Iterable[str], done: set[str]) -> None:
    """Sets the bar's total to the inputs left to do (a second, cheaper listing, beside the run)."""
    try:
        bar.total = sum(1 for key in keys if key not in done)
    except Exception as error:  # noqa: BLE001 - only the ETA is lost; the run itself reports bad inputs
        log.debug("counting the inputs for the progress bar failed: %s", error)


def run_over_images(embedder: ImageEmbedder, inputs: ImageInputs, output: Output,
                    on_batch: Callable[[list[str], np.ndarray], None], *, progress: bool = True,
                    desc: str = "images") -> RunSummary:
    """Embeds this process's share of `inputs` not yet in `output.done` and hands each batch (keys,
    features) to `on_batch`; unreadable inputs go to `output.skip` as they are found, and are named in
    one warning at the end. The embedder's own bar should be off (progress=False): this run shows one
    bar for the whole archive, sized by a count of the share's keys beside the run."""
    index, count = jax.process_index(), jax.process_count()
    start = time.monotonic()
    already = len(output.done)
    todo = (item for item in inputs.items(index, count) if item.key not in output.done)
    answered = skipped = 0
    skipped_before = len(embedder.skipped)
    with tqdm(total=None, unit="img", desc=desc, disable=not progress or index != 0, file=sys.stderr,
              smoothing=0.05) as bar:
        if not bar.disable:
            threading.Thread(target=_count_into, args=(bar, inputs.keys(index, count), output.done),
                             daemon=True, name="count inputs").start()
        for features, batch in embedder.stream(todo, desc=desc):
            on_batch([item.key for item in batch], features)
            answered += len(batch)
            new_skips = embedder.skipped[skipped_before + skipped:]
            for entry in new_skips:
                output.skip(entry.key, entry.reason)
            skipped += len(new_skips)
            bar.update(len(batch) + len(new_skips))
        for entry in embedder.skipped[skipped_before + skipped:]:
            output.skip(entry.key, entry.reason)
        bar.update(len(embedder.skipped) - skipped_before - skipped)
        skipped = len(embedder.skipped) - skipped_before
    report_skipped(embedder.skipped[skipped_before:])
    totals = np.asarray([answered, skipped], np.int64)
    if count > 1:  # (every process read the same earlier outputs: `already` is alike everywhere)
        totals = multihost_utils.process_allgather(totals).reshape(count, 2).sum(axis=0)
    return RunSummary(int(totals[0]), int(totals[1]), already, time.monotonic() - start)
