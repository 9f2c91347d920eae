"""BioCLIP 2's experience replay: a fixed count of general image-caption pairs in every batch.

The replay data is a second, independent training stream: its own shards, its own
shuffle (seed + REPLAY_SEED_OFFSET), its own global batch of `data.replay_per_batch`
pairs sliced over hosts as the main batch is. Global batch s of the run is main batch s
plus replay batch s, so the mix is exact and deterministic, and the mixed iterator's
state (both streams' positions) goes into every checkpoint: a resumed run continues both
streams where they stopped.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

REPLAY_SEED_OFFSET = 0x5EED  # keeps the replay shuffle apart from the main one
REPLAY_KEYS = ("replay_image", "replay_tokens")
PROJECTOR_KEY, REPLAY_PROJECTOR_KEY = "visual.proj", "visual.replay_proj"  # flat parameter keys


def replay_enabled(config) -> bool:
    """Whether the config mixes replay pairs into every batch (and the model has the replay projector)."""
    count = int(config.data.replay_per_batch)
    if count < 0:
        raise ValueError(f"config.data.replay_per_batch={count} must be >= 0")
    return count > 0


class ReplayMixer(grain.DatasetIterator):
    """Iterator of main batches with the replay batch of the same step added under REPLAY_KEYS.

    Skip counts of both streams are added up (a bad replay sample is counted like any other).
    `get_state`/`set_state` cover both streams; being a DatasetIterator, Grain's checkpoint
    handler saves the mix as JSON like any other iterator. (The streams are held, not made
    parents: their Grain contexts, worker pools included, stay their own.)
    """

    def __init__(self, main: Any, replay: Any):
        super().__init__()
        self.main, self.replay = main, replay

    def __next__(self) -> dict[str, np.ndarray]:
        batch, extra = dict(next(self.main)), next(self.replay)
        batch["replay_image"], batch["replay_tokens"] = extra["image"], extra["tokens"]
        batch["skipped"] = np.asarray(batch["skipped"]) + np.asarray(extra["skipped"])
        if int(batch["last_bad_shard"]) < 0:
            batch["last_bad_shard"] = extra["last_bad_shard"]  # a replay shard index, still worth naming
        return batch

    def get_state(self) -> dict:
        return {"main": self.main.get_state(), "replay": self.replay.get_state()}

    def set_state(self, state: dict) -> None:
        if set(state) != {"main", "replay"}:
            raise ValueError("the checkpoint's data state is not a replay mix (was replay off when it was saved?); "
                             "resume with the same data.replay_per_batch")
        self.main.set_state(state["main"])
        self.replay.set_state(state["replay"])

    def start_prefetch(self) -> None:
        for stream in (self.main, self.replay):
            if hasattr(stream, "start_prefetch"):
                stream.start_prefetch()

    def close(self) -> None:
        for stream in (self.main, self.replay):
            if hasattr(stream, "close"):
                stream.close()


def make_replay_dataset(config, *, tokenizer: Any, image_size: int, process_index: int = 0,
                        process_count: int = 1) -> grain.IterDataset:
    """This host's replay batches ({"image", "tokens", "skipped", ...}, replay_per_batch / hosts rows)."""
    from bioclip_jax.data.pipeline import make_train_dataset, read_options  # noqa: PLC0415 - it imports more

    count = int(config.data.replay_per_batch)
    if not config.data.replay_shards:
        raise ValueError(f"config.data.replay_per_batch={count} needs config.data.replay_shards (a webdataset of "
                         f"general image-caption pairs, e.g. LAION-2B: .jpg + .{config.data.replay_caption}); "
                         f"give it, or set --config.data.replay_per_batch=0 to train without replay")
    return make_train_dataset(
        config.data.replay_shards, global_batch_size=count,
        seed=(config.seed + REPLAY_SEED_OFFSET) % 2**32, text_type="taxon_com", tokenizer=tokenizer,
        image_size=image_size, process_index=process_index, process_count=process_count,
        caption=config.data.replay_caption, **read_options(config.data))
