"""Streaming embedding of images and texts with bounded memory.

Images: decoders (threads, or spawned worker processes) open, decode and crop images a few
batches ahead of the device, batches are a fixed size (the last one is padded) so one shape
compiles, the device normalises the uint8 pixels, and results are handed out batch by batch.
Unreadable images are skipped and listed by key.
Texts: tokenised in fixed-size chunks; the host tokenises chunk i+1 while the device
runs chunk i (JAX dispatch is asynchronous).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import itertools
import logging
import math
import multiprocessing
import pickle
import sys
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from bioclip_jax.data.batching import usable_cpus
from bioclip_jax.data.image_items import ImageItem
from bioclip_jax.models.clip import CLIP, l2_normalize, used_text_length
from bioclip_jax.parallel import sharding as sharding_lib
from bioclip_jax.pretrained import image_transform
from bioclip_jax.taxonomy.templates import OPENAI_IMAGENET_TEMPLATES, fill_templates
from bioclip_jax.tokenizer import get_tokenizer
from bioclip_jax.transforms import normalize

log = logging.getLogger(__name__)

DECODER_KINDS = ("processes", "threads")
# Threads by default: on a 2-core CPU a spawned process decoded no faster than a thread once started (PIL
# releases the interpreter lock while decoding and resizing), and its start, which imports JAX, costs seconds
# per stream (benchmarks/README.md, predict section). Processes pay off where per-image Python holds the lock.
DEFAULT_DECODERS = "threads"


@dataclasses.dataclass
class Skipped:
    key: str
    reason: str


@dataclasses.dataclass
class ImageEmbeddings:
    """Every embedded image of a stream: features [N, D] (L2-normalised) in input order."""

    features: np.ndarray
    keys: list[str]
    labels: list[Any]
    skipped: list[Skipped]


def _decode(item: ImageItem, pixels: Callable[[Image.Image], np.ndarray]) -> tuple[ImageItem, np.ndarray | Skipped]:
    try:
        opened = item.open()
        if isinstance(opened, tuple):
            opened, label = opened
            item = dataclasses.replace(item, label=label)
        with opened as image:
            image.load()  # a truncated file fails here, not later inside the crop
            return item, pixels(image)
    except Exception as error:  # noqa: BLE001 - any unreadable image is skipped and reported
        return item, Skipped(item.key, f"{type(error).__name__}: {error}")


def decoder_count(workers: int) -> int:
    """`workers` as given, or for -1 one decoder per usable CPU beyond the one that feeds the device
    (at least one): on 2 cores, one decoder beside the tower."""
    if workers == -1:
        return max(1, usable_cpus() - 1)
    if workers < 1:
        raise ValueError(f"image decoders (workers) must be >= 1, or -1 to size them from the CPUs, got {workers}")
    return workers


def _decoder_pool(kind: str, workers: int) -> concurrent.futures.Executor:
    if kind == "threads":
        return concurrent.futures.ThreadPoolExecutor(workers)
    # spawn, as the data pipeline's Grain workers do: a forked child would copy JAX's threads and locks mid-use
    return concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _picklable(item: ImageItem) -> bool:
    """Whether an item can travel to a decoding process (a lambda or an open handle cannot)."""
    try:
        pickle.dumps(item)
    except Exception as error:  # noqa: BLE001 - pickling raises many types; any of them means "decode here"
        log.debug("image items cannot be sent to decoding processes (%s: %s); decoding in threads",
                  type(error).__name__, error)
        return False
    return True


def _decoded_result(key: str, future: concurrent.futures.Future) -> tuple[ImageItem, np.ndarray | Skipped]:
    try:
        return future.result()
    except concurrent.futures.BrokenExecutor as error:
        raise RuntimeError(f"an image decoding process died (killed, out of memory, or a crash inside an image "
                           f"library) while decoding {key} or an image just before it, so the run stopped") from error


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _image_features(graphdef, state, pixels, mean, std, unit_length: bool = True, out_sharding=None):
    model = nnx.merge(graphdef, state)
    features = model.image_features(normalize(pixels, mean, std), normalize=unit_length)
    return features if out_sharding is None else jax.lax.with_sharding_constraint(features, out_sharding)


def default_devices() -> list:
    """All local accelerators; one device on CPU (simulated CPU devices share the same cores)."""
    devices = jax.local_devices()
    return devices if devices[0].platform != "cpu" else devices[:1]


class ImageEmbedder:
    """Embeds image streams of any length; only `prefetch` batches are ever held in memory.

    `workers` decoders (-1: one per usable CPU beyond the main process's, see `decoder_count`) run
    as `decoders`: "threads" (the default, see DEFAULT_DECODERS) or "processes", spawned per
    stream (a script that uses them needs the `if __name__ == "__main__":` guard; a stream whose
    items cannot be pickled, such as a lambda's, is decoded in threads instead). A decoding
    process that dies ends the stream with a RuntimeError, never a hang.

    With `mesh` (the training mesh, possibly spanning several processes) the model's
    parameters are used where they already live, every process decodes only its own
    rows of each global batch, and every process receives all features: this is how a
    pod evaluates during training. Labels must then be integers (they are gathered).
    """

    def __init__(self, model: CLIP, *, batch_size: int = 64, workers: int = -1, prefetch: int = 2,
                 progress: bool = True, devices: Sequence | None = None, unit_length: bool = True,
                 mesh: jax.sharding.Mesh | None = None, decoders: str = DEFAULT_DECODERS):
        if batch_size < 1 or prefetch < 1:
            raise ValueError(f"batch_size and prefetch must be >= 1, got {batch_size}, {prefetch}")
        if decoders not in DECODER_KINDS:
            raise ValueError(f"decoders must be one of {', '.join(DECODER_KINDS)}, got {decoders!r}")
        self.mesh = mesh
        self.workers, self.prefetch, self.progress = decoder_count(workers), prefetch, progress
        self.decoders = decoders
        self.unit_length = unit_length  # False: raw features, like open_clip's encode_image
        self.transform = image_transform(model)
        self.size = self.transform.cfg.size
        self.embed_dim = model.config.embed_dim
        self.skipped: list[Skipped] = []
        self._graphdef, state = nnx.split(model)
        if mesh is None:
            self.devices = list(devices or default_devices())
            local_mesh = jax.sharding.Mesh(np.asarray(self.devices), ("data",))
            self._batch_sharding = jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec("data"))
            self._state = jax.device_put(state, jax.sharding.NamedSharding(local_mesh, jax.sharding.PartitionSpec()))
            self._out_sharding = None
            multiple = len(self.devices)
        else:
            self._state = state  # global arrays, already laid out on the mesh
            self._out_sharding = sharding_lib.replicated(mesh)
            multiple = math.lcm(sharding_lib.batch_shard_count(mesh), jax.process_count())
        self.batch_size = -(-batch_size // multiple) * multiple

    def _run(self, pixels: np.ndarray) -> jax.Array:
        cfg = self.transform.cfg
        if self.mesh is None:
            batch = jax.device_put(pixels, self._batch_sharding)
        else:
            batch = sharding_lib.host_batch_to_global(pixels, self.mesh)
        return _image_features(self._graphdef, self._state, batch, tuple(cfg.mean), tuple(cfg.std),
                               self.unit_length, self._out_sharding)

    def _decoded(self, items: Iterable[ImageItem]) -> Iterator[tuple[ImageItem, np.ndarray | Skipped]]:
        """Items with their pixels, in input order, decoded by the pool a bounded window ahead."""
        items = iter(items)
        first = next(items, None)
        if first is None:
            return
        kind = self.decoders if self.decoders == "threads" or _picklable(first) else "threads"
        window = self.batch_size * self.prefetch
        pool = _decoder_pool(kind, self.workers)
        pending: collections.deque[tuple[str, concurrent.futures.Future]] = collections.deque()
        try:
            for item in itertools.chain([first], items):
                pending.append((item.key, pool.submit(_decode, item, self.transform.pixels)))
                if len(pending) >= window:
                    yield _decoded_result(*pending.popleft())
            while pending:
                yield _decoded_result(*pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # a stream closed early leaves no decoder behind

    def stream(self, items: Iterable[ImageItem], total: int | None = None,
               desc: str = "images") -> Iterator[tuple[np.ndarray, list[ImageItem]]]:
        """Yields (features [b, D] float32, the b items embedded) per batch; skips go to `self.skipped`."""
        if self.mesh is not None:
            yield from self._stream_over_processes(list(items), desc)
            return
        buffer = np.zeros((self.batch_size, self.size, self.size, 3), self.transform.pixel_dtype)
        filled: list[ImageItem] = []
        in_flight: tuple[jax.Array, list[ImageItem]] | None = None
        with tqdm(total=total, unit="img", desc=desc, disable=not self.progress, file=sys.stderr) as bar:
            for item, pixels in self._decoded(items):
                bar.update()
                if isinstance(pixels, Skipped):
                    self.skipped.append(pixels)
                    continue
                buffer[len(filled)] = pixels
                filled.append(item)
                if len(filled) == self.batch_size:
                    launched = (self._run(buffer.copy()), filled)  # dispatch, then collect the previous
                    if in_flight is not None:
                        yield np.asarray(in_flight[0]), in_flight[1]
                    in_flight, filled = launched, []
            if in_flight is not None:
                yield np.asarray(in_flight[0]), in_flight[1]
            if filled:
                buffer[len(filled):] = 0
                yield np.asarray(self._run(buffer))[: len(filled)], filled

    def _stream_over_processes(self, items: list[ImageItem], desc: str
                               ) -> Iterator[tuple[np.ndarray, list[ImageItem]]]:
        """Mesh mode: global batch k holds items [k*G, (k+1)*G); process p decodes its rows
        [p*L, (p+1)*L) of it. Which rows were readable, and their labels, are gathered, so
        every process yields the same features and items."""
        global_rows = self.batch_size
        local_rows = global_rows // jax.process_count()
        first_row = jax.process_index() * local_rows
        batches = -(-len(items) // global_rows)
        own = [[i for i in range(k * global_rows + first_row, k * global_rows + first_row + local_rows)
                if i < len(items)] for k in range(batches)]
        decoded = self._decoded(items[i] for rows in own for i in rows)
        with tqdm(total=len(items), unit="img", desc=desc, disable=not self.progress or jax.process_index(),
                  file=sys.stderr) as bar:
            for k, rows in enumerate(own):
                pixels = np.zeros((local_rows, self.size, self.size, 3), self.transform.pixel_dtype)
                labels = np.full((local_rows,), -1, np.int64)
                readable = np.zeros((local_rows,), bool)
                for j in range(len(rows)):
                    item, decoded_pixels = next(decoded)
                    if isinstance(decoded_pixels, Skipped):
                        self.skipped.append(decoded_pixels)
                        continue
                    pixels[j], readable[j] = decoded_pixels, True
                    labels[j] = -1 if item.label is None else int(item.label)
                features = np.asarray(self._run(pixels))
                gathered = multihost_utils.process_allgather(np.stack([readable.astype(np.int64), labels]))
                readable_all = gathered[:, 0].reshape(-1).astype(bool)
                labels_all = gathered[:, 1].reshape(-1)
                start = k * global_rows
                kept = [r for r in range(global_rows) if readable_all[r]]
                batch = [dataclasses.replace(items[start + r], label=None if labels_all[r] < 0 else int(labels_all[r]))
                         for r in kept]
                bar.update(min(global_rows, len(items) - start))
                yield features[kept], batch

    def embed_all(self, items: Iterable[ImageItem], total: int | None = None,
                  desc: str = "images") -> ImageEmbeddings:
        """Collects a whole stream (N x D floats; the images themselves are never all in memory)."""
        start = len(self.skipped)
        chunks, keys, labels = [], [], []
        for features, batch in self.stream(items, total, desc):
            chunks.append(features)
            keys += [item.key for item in batch]
            labels += [item.label for item in batch]
        features = np.concatenate(chunks) if chunks else np.zeros((0, self.embed_dim), np.float32)
        return ImageEmbeddings(features, keys, labels, self.skipped[start:])


def report_skipped(skipped: Sequence[Skipped], what: str = "images", limit: int = 20) -> None:
    """One warning with a line per unreadable input (the first `limit` of them)."""
    if not skipped:
        return
    lines = [f"skipped {len(skipped)} unreadable {what}:"]
    lines += [f"  {entry.key}: {entry.reason}" for entry in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    log.warning("\n".join(lines))


# ---- texts -------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _template_means(graphdef, state, tokens, num_templates: int, out_sharding=None):
    """[n * T, L] tokens -> [n, D]: normalise per prompt, average the T prompts, normalise again."""
    model = nnx.merge(graphdef, state)
    features = model.text_features(tokens, normalize=True)
    means = l2_normalize(features.reshape(-1, num_templates, features.shape[-1]).mean(axis=1))
    return means if out_sharding is None else jax.lax.with_sharding_constraint(means, out_sharding)


class TextEmbedder:
    """Text embeddings in fixed-size chunks (one compiled shape), for any number of texts.

    With `mesh`, the model's parameters stay where they live on that mesh (every process
    tokenises the same texts) and every process receives all embeddings.
    """

    def __init__(self, model: CLIP, *, batch_size: int = 256, progress: bool = False,
                 mesh: jax.sharding.Mesh | None = None):
        if batch_size < 1:
            raise ValueError(f"text batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.progress = progress
        self.embed_dim = model.config.embed_dim
        self.tokenizer = get_tokenizer("ViT-B-16", context_length=model.config.text.context_length)
        self._graphdef, self._state = nnx.split(model)
        self.mesh = mesh
        self._out_sharding = None if mesh is None else sharding_lib.replicated(mesh)

    def _embed_prompts(self, tokens: np.ndarray, num_templates: int) -> jax.Array:
        if self.mesh is not None:
            tokens = sharding_lib.replicate_host_array(tokens, self.mesh)
        return _template_means(self._graphdef, self._state, tokens, num_templates, self._out_sharding)

    def class_chunks(self, class_names: Iterable[str], num_classes: int | None = None,
                     templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
                     desc: str = "class names") -> Iterator[np.ndarray]:
        """Yields [n, D] class embeddings (normalised mean over templates), chunk by chunk, in order."""
        templates = tuple(templates)
        per_chunk = max(1, self.batch_size // len(templates))
        if num_classes:
            per_chunk = min(per_chunk, num_classes)  # a short list is not padded to a full batch
        in_flight: tuple[jax.Array, int] | None = None
        with tqdm(total=num_classes, unit="name", desc=desc, disable=not self.progress, file=sys.stderr) as bar:
            for names in _chunked(class_names, per_chunk):
                prompts = [p for name in names for p in fill_templates(name, templates)]
                prompts += [""] * ((per_chunk - len(names)) * len(templates))  # pad: one shape
                tokens = self.tokenizer(prompts)
                tokens = tokens[:, :used_text_length(tokens, self.tokenizer.context_length)]
                launched = (self._embed_prompts(tokens, len(templates)), len(names))
                if in_flight is not None:
                    yield np.asarray(in_flight[0])[: in_flight[1]]
                    bar.update(in_flight[1])
                in_flight = launched
            if in_flight is not None:
                yield np.asarray(in_flight[0])[: in_flight[1]]
                bar.update(in_flight[1])

    def classes(self, class_names: Sequence[str], templates: Sequence[str] = OPENAI_IMAGENET_TEMPLATES,
                desc: str = "class names") -> np.ndarray:
        """[C, D] class embeddings for a list of class names."""
        chunks = list(self.class_chunks(class_names, len(class_names), templates, desc))
        return np.concatenate(chunks) if chunks else np.zeros((0, self.embed_dim), np.float32)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[N, D] normalised embeddings of plain texts (no templates)."""
        return self.classes(texts, templates=("{}",), desc="texts")


def _chunked(values: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for value in values:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def softmax_probabilities(image_features: np.ndarray, class_features: np.ndarray, logit_scale: float) -> np.ndarray:
    """pybioclip's scores: softmax(exp(logit_scale) * image @ classes.T) over classes, float32."""
    logits = jnp.float32(np.exp(logit_scale)) * jnp.asarray(image_features) @ jnp.asarray(class_features).T
    return np.asarray(jax.nn.softmax(logits, axis=-1))
