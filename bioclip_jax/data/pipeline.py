"""The training input pipeline: shards -> globally shuffled, host-sliced, decoded, tokenised batches.

    source -> shuffle(seed, new order each epoch) -> repeat -> host slice
      -> per example: read, decode+crop, tokenise (threads in worker processes) -> batch

Everything is a pure function of (seed, global position p in the shuffled stream):
global batch s holds positions [s*B, (s+1)*B), host h of H takes those with
p % H == h, and the crop of position p uses an RNG seeded by (seed, p). So the
batches do not depend on the number of hosts or Grain workers, and the iterator
state (one counter) resumes a run exactly. How examples are made in parallel,
and the memory that bounds, is in `batching`.

Bad samples (see SKIP_REASONS) never stop training: the sample at position p is
replaced by the next good one after it in the shuffled stream (so batch shapes and
determinism hold), and every batch counts its replacements by reason in
`skipped`. `SkipBudget` turns a sustained excess of them into a clear error.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Mapping

import grain
import numpy as np

from bioclip_jax.data import batching, decode
from bioclip_jax.data.array_record import ArrayRecordSampleSource
from bioclip_jax.data.shard_patterns import expand_shard_pattern
from bioclip_jax.data.tar_source import DETAIL, ERROR, TarShardSource
from bioclip_jax.taxonomy import CAPTION_FILES, TextTypeSampler
from bioclip_jax.tokenizer import get_tokenizer

SKIP_REASONS = ("corrupt_image", "missing_image", "missing_caption", "truncated_tar", "unreadable_shard",
                "corrupt_caption")
IMAGE_MEMBER = "jpg"
MAX_REPLACEMENT_TRIES = 64
TFDS_PREFIX = "tfds:"
_CROP_STREAM = 0xC60F  # keeps crop seeds apart from any other use of (seed, position)
_MEMBER_OF_TYPE = {text_type: extension for extension, text_type in CAPTION_FILES.items()}

log = logging.getLogger(__name__)


class BadDataError(RuntimeError):
    """Too much of the data is unusable to train on it."""


class SkippedSample(Exception):
    """One sample cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- samples


def open_sample_source(shards: Any, cache_dir: str | None = None):
    """A random-access sample source for a shard pattern: tar shards, converted ArrayRecord files, or
    "tfds:name" (a TensorFlow Datasets dataset, read by `tfds_source`).

    An object that already has `__len__` and `__getitem__` (and is not a list of
    paths) is returned as it is.
    """
    if hasattr(shards, "__getitem__") and hasattr(shards, "__len__") and not isinstance(shards, (str, list, tuple)):
        return shards
    if isinstance(shards, str) and shards.startswith(TFDS_PREFIX):
        from bioclip_jax.data.tfds_source import open_tfds_source  # noqa: PLC0415 (optional dependency)

        return open_tfds_source(shards[len(TFDS_PREFIX):])
    paths = expand_shard_pattern(shards)
    converted = [path.endswith(".array_record") for path in paths]
    if all(converted):
        return ArrayRecordSampleSource(paths)
    if any(converted):
        raise ValueError(f"shard pattern {shards!r} mixes .array_record files with tar shards; use one kind")
    return TarShardSource(paths, cache_dir=cache_dir)


def caption_member(text_type: str) -> str:
    """The webdataset extension holding the caption of one text type ("taxon_com" -> "taxon_com.txt")."""
    return _MEMBER_OF_TYPE.get(text_type, f"{text_type}.txt")


def caption_text(raw: Mapping[str, Any], extension: str) -> str:
    """The stripped caption stored under `extension`, "" when absent or empty.

    Bytes that are not UTF-8 raise SkippedSample("corrupt_caption"): decoded with
    replacement characters they would teach the model a mangled name.
    """
    text = raw.get(extension)
    if not text:
        return ""
    try:
        return text.decode("utf-8").strip()
    except UnicodeDecodeError as error:
        raise SkippedSample("corrupt_caption", f"sample {raw.get('__key__')}: .{extension} is not UTF-8 "
                                               f"({error})") from None


def usable_parts(raw: Mapping[str, Any], caption_ext: str | None) -> tuple[bytes, str | None]:
    """(image bytes, caption) of a raw sample, or SkippedSample saying why it cannot be used.

    With `caption_ext` None the caption is not required.
    """
    if ERROR in raw:
        raise SkippedSample(raw[ERROR], raw.get(DETAIL, ""))
    image = raw.get(IMAGE_MEMBER)
    if not image:
        raise SkippedSample("missing_image", f"sample {raw.get('__key__')} has no .{IMAGE_MEMBER}")
    if caption_ext is None:
        return image, None
    caption = caption_text(raw, caption_ext)
    if not caption:
        raise SkippedSample("missing_caption", f"sample {raw.get('__key__')} has no or an empty .{caption_ext}")
    return image, caption


def prepare_sample(raw: Mapping[str, Any], caption_ext: str | None, image_size: int | tuple[int, int],
                   rng: np.random.Generator, crop_scale: tuple[float, float] = decode.DEFAULT_SCALE
                   ) -> tuple[np.ndarray, str | None]:
    """(cropped uint8 image, caption) of a raw sample, or SkippedSample."""
    image, caption = usable_parts(raw, caption_ext)
    try:
        pixels = decode.decode_and_crop(image, image_size, rng, scale=crop_scale)
    except decode.ImageDecodeError as error:
        raise SkippedSample("corrupt_image", f"sample {raw.get('__key__')}: {error}") from None
    return pixels, caption


def crop_rng(seed: int, position: int) -> np.random.Generator:
    """The crop RNG of one position of the shuffled stream (fixed-width words: no seed collisions)."""
    return np.random.default_rng([_CROP_STREAM, seed & 0xFFFFFFFF, seed >> 32,
                                  position & 0xFFFFFFFF, position >> 32])


# ----------------------------------------------------------------------------- examples


class _ExampleMaker:
    """Example k of this host (shuffled position p = k * hosts + host), bad samples replaced.

    Returns {"image": uint8 [S, S, 3], "tokens": int32 [T], "skip_reason": int32 (index
    in SKIP_REASONS of the replaced sample's defect, -1 if none), "bad_shard": int32,
    "position": int64}; `join_batch` turns a batch of them into the batch contract.
    """

    def __init__(self, stream: grain.MapDataset, *, host: int, hosts: int, global_batch: int, seed: int,
                 sampler: Any, tokenizer: Callable[[list[str]], np.ndarray], image_size: int | tuple[int, int],
                 crop_scale: tuple[float, float], caption: str | None = None):
        self.stream = stream
        self.caption = caption  # a fixed caption member for every sample, instead of the sampled text type
        self.host, self.hosts, self.global_batch = host, hosts, global_batch
        self.seed, self.sampler, self.tokenizer = seed, sampler, tokenizer
        self.image_size, self.crop_scale = image_size, crop_scale

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        position = k * self.hosts + self.host
        step, in_batch = divmod(position, self.global_batch)
        member = self.caption or caption_member(self.sampler.types_for_batch(step, np.array([in_batch]))[0])
        raw = self.stream[position]
        reason, bad_shard = -1, -1
        try:
            pixels, caption = prepare_sample(raw, member, self.image_size, crop_rng(self.seed, position),
                                             self.crop_scale)
        except SkippedSample as skip:
            reason, bad_shard = SKIP_REASONS.index(skip.reason), int(raw.get("__shard__", -1))
            pixels, caption = self._replacement(position, member, skip)
        return {"image": pixels, "tokens": np.asarray(self.tokenizer([caption]), dtype=np.int32)[0],
                "skip_reason": np.int32(reason), "bad_shard": np.int32(bad_shard), "position": np.int64(position)}

    def _replacement(self, position: int, member: str, first: SkippedSample) -> tuple[np.ndarray, str]:
        """The next good sample after `position` in the shuffled stream (the same on every host)."""
        for offset in range(1, MAX_REPLACEMENT_TRIES + 1):
            raw = self.stream[(position + offset) % len(self.stream)]
            try:
                return prepare_sample(raw, member, self.image_size, crop_rng(self.seed, position), self.crop_scale)
            except SkippedSample:
                continue
        raise BadDataError(
            f"the {MAX_REPLACEMENT_TRIES + 1} samples from shuffled position {position} on are all unusable "
            f"for caption .{member} (first: {first}); run check_data on the shards")


def join_batch(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacked examples, in order -> one batch, with its replaced samples counted by reason.

    The images come here only where there is no POSIX shared memory: elsewhere the workers
    write them straight into the batch's array (`batching`).
    """
    def joined(key: str) -> np.ndarray:
        return np.concatenate([chunk[key] for chunk in chunks])

    reasons, bad_shards = joined("skip_reason"), joined("bad_shard")
    replaced = reasons >= 0
    batch = {key: joined(key) for key in chunks[0] if key not in ("skip_reason", "bad_shard")}
    batch["skipped"] = np.bincount(reasons[replaced], minlength=len(SKIP_REASONS)).astype(np.int32)
    batch["last_bad_shard"] = np.int32(bad_shards[replaced][-1] if replaced.any() else -1)
    batch["position"] = batch["position"].astype(np.int64)
    return batch


def _check_source(source: Any, max_bad_fraction: float) -> None:
    problems = getattr(source, "problems", {})
    paths = getattr(source, "shard_paths", [])
    for problem in problems.values():
        log.warning("%s", problem)
    unreadable = [path for path, text in problems.items() if text.startswith("cannot read")]
    if paths and len(unreadable) / len(paths) > max_bad_fraction:
        raise BadDataError(f"{len(unreadable)} of {len(paths)} shards cannot be read (more than "
                           f"{max_bad_fraction:.1%}), e.g. {problems[unreadable[0]]}")
    if len(source) == 0:
        raise BadDataError(f"the shards hold no samples: {source!r}")


def make_train_dataset(shards: Any, *, global_batch_size: int, seed: int, text_type: Any, tokenizer: Any,
                       image_size: int = 224, process_index: int = 0, process_count: int = 1,
                       num_epochs: int | None = None, worker_count: int = -1,
                       crop_scale: tuple[float, float] = decode.DEFAULT_SCALE, max_bad_fraction: float = 0.01,
                       cache_dir: str | None = None, read_threads: int = 8,
                       chunk_examples: int = batching.MAX_CHUNK_EXAMPLES, caption: str | None = None
                       ) -> grain.IterDataset:
    """This host's batches: {"image": uint8 [b, S, S, 3], "tokens": int32 [b, 77],
    "skipped": int32 [len(SKIP_REASONS)], "last_bad_shard": int32 (-1 if none), "position": int64 [b]}.

    `shards` is a pattern (tar or .array_record, or "tfds:name"), a list of paths, or a
    sample source; `text_type` a TextTypeSampler spec or sampler; `tokenizer` a callable
    or a model name. `b = global_batch_size / process_count`. With `num_epochs`
    set, every host yields the same number of full global batches. `worker_count` -1
    sizes the worker processes from the usable CPUs (see batching.resolve_worker_count);
    each worker (or the main process, with 0) reads and decodes with `read_threads`
    threads, `chunk_examples` examples at a time (memory bound: see batching). `caption`
    names one caption member for every sample (e.g. "txt" of general image-caption data)
    instead of the text types.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be positive and divisible by "
                         f"process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    workers = batching.resolve_worker_count(worker_count)
    source = open_sample_source(shards, cache_dir)
    _check_source(source, max_bad_fraction)
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    if not hasattr(text_type, "types_for_batch"):
        text_type = TextTypeSampler(text_type, seed)

    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    make_example = _ExampleMaker(stream, host=process_index, hosts=process_count, global_batch=global_batch_size,
                                 seed=seed, sampler=text_type, tokenizer=tokenizer, image_size=image_size,
                                 crop_scale=tuple(crop_scale), caption=caption)
    return batching.ParallelBatches(
        make_example, join_batch, local_batch=global_batch_size // process_count,
        num_batches=None if num_epochs is None else len(stream) // global_batch_size,
        workers=workers, read_threads=read_threads, chunk_examples=chunk_examples, direct_keys=("image",))


def read_options(data_config: Any) -> dict[str, Any]:
    """How a training config's `data` section says to read any training stream (main or replay)."""
    return {"worker_count": data_config.workers, "crop_scale": tuple(data_config.crop_scale),
            "max_bad_fraction": data_config.max_bad_fraction, "cache_dir": data_config.index_cache_dir or None}


# ----------------------------------------------------------------------------- budget


class SkipBudget:
    """Raises BadDataError when more than `max_bad_fraction` of recent samples were skipped.

    Feed it every batch: `budget.update(batch_size, batch["skipped"], batch["last_bad_shard"])`.
    It judges a sliding window of about `window_samples` samples, and only once it
    has seen `min_samples`, so a few bad samples early on do not stop a run.
    """

    def __init__(self, max_bad_fraction: float = 0.01, shards: Any = None, window_samples: int = 50_000,
                 min_samples: int = 5_000):
        if not 0 <= max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        if isinstance(shards, str):  # a TFDS dataset has no shard files to name
            self.shards = [] if shards.startswith(TFDS_PREFIX) else expand_shard_pattern(shards)
        else:
            self.shards = list(shards or [])
        self.window_samples = window_samples
        self.min_samples = min(min_samples, window_samples)
        self._window: collections.deque = collections.deque()
        self._seen = 0
        self._skipped = np.zeros(len(SKIP_REASONS), dtype=np.int64)

    @property
    def fraction(self) -> float:
        return float(self._skipped.sum()) / self._seen if self._seen else 0.0

    def update(self, samples: int, skipped: Any, last_bad_shard: Any = -1) -> None:
        counts = np.asarray(skipped, dtype=np.int64).reshape(-1, len(SKIP_REASONS)).sum(axis=0)
        shards = [int(s) for s in np.asarray(last_bad_shard).reshape(-1) if s >= 0]
        self._window.append((int(samples), counts, shards))
        self._seen += int(samples)
        self._skipped += counts
        while len(self._window) > 1 and self._seen - self._window[0][0] >= self.window_samples:
            old_samples, old_counts, _ = self._window.popleft()
            self._seen -= old_samples
            self._skipped -= old_counts
        if self._seen >= self.min_samples and self.fraction > self.max_bad_fraction:
            raise BadDataError(self._message())

    def _shard_names(self) -> list[str]:
        recent: list[int] = []
        for _, _, shards in reversed(self._window):
            recent += [s for s in shards if s not in recent]
        return [self.shards[s] if s < len(self.shards) else f"shard #{s}" for s in recent[:3]]

    def _message(self) -> str:
        order = np.argsort(-self._skipped, kind="stable")
        reasons = ", ".join(f"{SKIP_REASONS[i]} {self._skipped[i]}" for i in order if self._skipped[i])
        shards = self._shard_names()
        where = f"; recent bad samples came from {', '.join(shards)}" if shards else ""
        return (f"{int(self._skipped.sum())} of the last {self._seen} samples ({self.fraction:.1%}) were skipped, "
                f"more than the allowed {self.max_bad_fraction:.1%}: mostly {SKIP_REASONS[order[0]]} "
                f"({reasons}){where}. Run `python -m bioclip_jax.cli.check_data --shards ...` to list them.")
