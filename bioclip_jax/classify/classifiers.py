"""pybioclip's three classifiers on bioclip_jax, for code written against pybioclip's Python API.

    classifier = TreeOfLifeClassifier()                 # BioCLIP 2 and its tree of life, as pybioclip
    records = classifier.predict(["a.jpg", "b.jpg"], rank="family", k=3)
    records = classifier.predict(images, rank="auto", confidence=0.8)   # the deepest rank it is sure of

`predict` returns pybioclip's records (a list of dicts: file_name, the label or taxon columns,
score), k per image, in input order. Images are file paths, PIL images or H x W x C uint8
arrays; a path's file_name is the path as given, any other image's its index in the list, as
pybioclip names them. Images stream through the device in fixed-size batches, so a list of any
length fits in memory; an unreadable file is skipped, logged and kept in `skipped`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from bioclip_jax import hub, transforms
from bioclip_jax import taxa_embeddings as taxa_embeddings_lib
from bioclip_jax.classify import labels as labels_lib
from bioclip_jax.classify.open_set import DEFAULT_CONFIDENCE, OpenSetPredictor
from bioclip_jax.classify.scoring import Predictor
from bioclip_jax.data.image_inputs import file_input
from bioclip_jax.data.image_items import ImageItem
from bioclip_jax.inference import ImageEmbedder, Skipped, report_skipped
from bioclip_jax.models.clip import CLIP
from bioclip_jax.outputs.run_record import fingerprint
from bioclip_jax.pretrained import create_model, pybioclip_preprocessing
from bioclip_jax.sources import RANDOM, is_source
from bioclip_jax.taxonomy import RANKS

AUTO = "auto"  # the open-set rank: the deepest one the classifier is sure of


def load_model(model: str | CLIP, pretrained: str | None = None, seed: int = 0) -> CLIP:
    """A built model as is, else pybioclip's model_str (a source) or an architecture with `pretrained`;
    pybioclip's two tree-of-life models are preprocessed as pybioclip does."""
    if not isinstance(model, CLIP):
        if not is_source(model) and pretrained is None:
            raise ValueError(f"model_str {model!r} names no weights: give a source such as {hub.DEFAULT_MODEL} or "
                             f"local-dir:PATH, or pretrained_str (a source, or {RANDOM!r} for random weights)")
        model = create_model(model, pretrained, seed=seed)
    return pybioclip_preprocessing(model)


def _rgb_copy(image: Image.Image) -> Image.Image:
    """The embedder closes what it opens: give it a copy, never the caller's image."""
    return transforms.to_rgb(image.copy())


def _array_image(array: np.ndarray) -> Image.Image:
    return transforms.to_rgb(Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array))


def _check_array(array: np.ndarray, index: int) -> None:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(f"images[{index}] is a {array.dtype} array of shape {array.shape}; "
                         "arrays must be H x W x 3 (or H x W, H x W x 4) uint8")


def image_items(images: Any) -> list[ImageItem]:
    """One image or a list of them as embedder items, keyed as pybioclip keys its records."""
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim < 4):
        images = [images]
    if not isinstance(images, (list, tuple, np.ndarray)):
        raise ValueError(f"images is a {type(images).__name__}; give a file path, PIL image or H x W x 3 uint8 "
                         "array, or a list of them")
    items = []
    for index, image in enumerate(images):
        if isinstance(image, (str, os.PathLike)):
            path = os.fspath(image)
            items.append(file_input(path))
        elif isinstance(image, Image.Image):
            items.append(ImageItem(str(index), functools.partial(_rgb_copy, image)))
        elif isinstance(image, np.ndarray):
            _check_array(image, index)
            items.append(ImageItem(str(index), functools.partial(_array_image, image)))
        else:
            raise ValueError(f"images[{index}] is a {type(image).__name__}; give file paths, PIL images "
                             "or H x W x 3 uint8 arrays")
    return items


def rank_name(rank: Any) -> str:
    """'family', or pybioclip's Rank.FAMILY (any enum named by a rank), or 'auto'."""
    name = str(getattr(rank, "name", rank)).strip().lower()
    if name not in (*RANKS, AUTO):
        raise ValueError(f"rank must be one of {', '.join((*RANKS, AUTO))}, got {rank!r}")
    return name


class Classifier:
    """What the three share: the model, the image stream, and the batch size that one compile serves.

    Keywords beyond these (workers, decoders, devices, prefetch) go to `inference.ImageEmbedder`."""

    def __init__(self, model_str: str | CLIP = hub.DEFAULT_MODEL, pretrained_str: str | None = None, *,
                 batch_size: int = 32, progress: bool = True, seed: int = 0, **embedder_options):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = load_model(model_str, pretrained_str, seed)
        self.batch_size, self.progress, self.embedder_options = batch_size, progress, embedder_options
        self.skipped: list[Skipped] = []  # the unreadable images of the last predict
        self._embedders: dict[int, ImageEmbedder] = {}

    def _embedder(self, batch_size: int | None) -> ImageEmbedder:
        batch_size = batch_size or self.batch_size
        if batch_size not in self._embedders:
            self._embedders[batch_size] = ImageEmbedder(self.model, batch_size=batch_size, progress=self.progress,
                                                        **self.embedder_options)
        return self._embedders[batch_size]

    def scorer(self, batch_size: int, **options) -> Predictor | OpenSetPredictor:
        """What turns a batch of image features into rows (`rows(keys, features)`, `rows_per_image`),
        for batches padded to `batch_size`; `options` are predict's (rank, k, ...)."""
        raise NotImplementedError

    def label_names(self) -> list:
        """What the images are scored against, by name: an output records its fingerprint."""
        raise NotImplementedError

    def labels_fingerprint(self) -> str:
        """A short hash of `label_names()`: a resumed output refuses rows scored against other labels."""
        return fingerprint(self.label_names())

    def _predict(self, images: Any, batch_size: int | None, predictor: Callable[[int], Predictor | OpenSetPredictor],
                 callback: Callable[[int, int], None] | None = None) -> list[dict]:
        """Rows of every readable image; `predictor` is built for the embedder's (padded) batch size;
        `callback(images done, images in all)` after each batch, as pybioclip calls it."""
        items = image_items(images)
        embedder = self._embedder(batch_size)
        embedder.skipped = []
        scorer = predictor(embedder.batch_size)
        rows: list[dict] = []
        embedded = 0
        for features, batch in embedder.stream(items, total=len(items)):
            rows += scorer.rows([item.key for item in batch], features)
            embedded += len(batch)
            if callback:
                callback(embedded + len(embedder.skipped), len(items))
        self.skipped = embedder.skipped
        if callback and self.skipped and not embedded:
            callback(len(self.skipped), len(items))  # every image was unreadable: no batch reported it
        report_skipped(self.skipped)
        return rows


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


class TreeOfLifeClassifier(Classifier):
    """Species (or any rank, or the deepest rank it is sure of) over a tree of life: by default the one
    pybioclip pairs with the model; or `taxa_embeddings` (an embed-taxa or pybioclip folder), or a
    `taxa` catalog CSV embedded once and cached; `subset` (pybioclip's CSV) keeps only the taxa it lists."""

    def __init__(self, model_str: str | CLIP = hub.DEFAULT_MODEL, pretrained_str: str | None = None, *,
                 taxa_embeddings: str | None = None, taxa: str | None = None, subset: str | None = None,
                 text_type: str = "taxon_com", **options):
        if taxa_embeddings and not taxa and not taxa_embeddings_lib.has_taxa_embeddings(taxa_embeddings):
            raise FileNotFoundError(f"no taxa embeddings in {taxa_embeddings} ({taxa_embeddings_lib.EMBEDDINGS_FILE}):"
                                    " make them with `bioclip-jax embed-taxa`, or pass taxa= a catalog to build them")
        super().__init__(model_str, pretrained_str, **options)
        features, self.taxa = labels_lib.load_tree_of_life(
            self.model, taxa_embeddings_dir=taxa_embeddings, taxa_catalog=taxa, text_type=text_type, subset=subset,
            progress=self.progress)
        self._features = jnp.asarray(features, jnp.float32)  # on the device once, for every rank
        self._labels: dict[tuple[str, float], labels_lib.Labels] = {}  # (rank, min_prob): grouping takes time
        self._open_sets: dict[int, OpenSetPredictor] = {}  # per batch size

    def scorer(self, batch_size: int, rank: Any = "species", k: int = 5,
               min_prob: float = labels_lib.DEFAULT_MIN_PROB,
               confidence: float = DEFAULT_CONFIDENCE) -> Predictor | OpenSetPredictor:
        rank = rank_name(rank)
        _check_k(k)
        if rank == AUTO:
            return self._open_set(batch_size).with_settings(confidence, min_prob)
        if (rank, min_prob) not in self._labels:
            self._labels[rank, min_prob] = labels_lib.tree_of_life_labels(self._features, self.taxa, rank, min_prob)
        return Predictor(self.model, self._labels[rank, min_prob], k, batch_size)

    def label_names(self) -> list:
        return [taxa_embeddings_lib.names_entry(taxon) for taxon in self.taxa]

    def predict(self, images: Any, rank: Any = "species", min_prob: float = labels_lib.DEFAULT_MIN_PROB,
                k: int = 5, batch_size: int | None = None, callback: Callable[[int, int], None] | None = None,
                confidence: float = DEFAULT_CONFIDENCE) -> list[dict]:
        """k records per image at `rank`; with rank='auto' one record per image at the deepest rank whose
        summed probability reaches `confidence` (pybioclip's columns plus `rank`, see classify.open_set)."""
        rank_name(rank)  # a wrong rank or k is reported before any image is read
        _check_k(k)
        return self._predict(images, batch_size, functools.partial(self.scorer, rank=rank, k=k, min_prob=min_prob,
                                                                   confidence=confidence), callback)

    def _open_set(self, batch_size: int) -> OpenSetPredictor:
        if batch_size not in self._open_sets:
            self._open_sets[batch_size] = OpenSetPredictor(self.model, self._features, self.taxa,
                                                           batch_size=batch_size)
        return self._open_sets[batch_size]


class CustomLabelsClassifier(Classifier):
    """Your own labels, embedded as pybioclip does (80 OpenAI templates, normalised mean)."""

    def __init__(self, cls_ary: Sequence[str], model_str: str | CLIP = hub.DEFAULT_MODEL,
                 pretrained_str: str | None = None, **options):
        names = labels_lib.unique_labels(list(cls_ary), "cls_ary")
        if not names:
            raise ValueError("cls_ary holds no labels: give at least one class name")
        super().__init__(model_str, pretrained_str, **options)
        self.labels = self._labels(names)

    def _labels(self, names: list[str]) -> labels_lib.Labels:
        return labels_lib.custom_labels(self.model, names)

    def scorer(self, batch_size: int, k: int | None = None) -> Predictor:
        _check_k(k)
        return Predictor(self.model, self.labels, k or len(self.labels.groups), batch_size)

    def label_names(self) -> list:
        return [group["classification"] for group in self.labels.groups]

    def predict(self, images: Any, k: int | None = None, batch_size: int | None = None,
                callback: Callable[[int, int], None] | None = None) -> list[dict]:
        """The k best labels per image (all of them by default, as pybioclip)."""
        return self._predict(images, batch_size, functools.partial(self.scorer, k=k), callback)


class CustomLabelsBinningClassifier(CustomLabelsClassifier):
    """Your labels, each summed into its bin (class -> bin): a bin's score is the sum over its classes."""

    def __init__(self, cls_to_bin: Mapping[str, str], model_str: str | CLIP = hub.DEFAULT_MODEL,
                 pretrained_str: str | None = None, **options):
        empty = [name for name, bin_name in cls_to_bin.items() if not isinstance(bin_name, str) or not bin_name.strip()]
        if empty:
            raise ValueError(f"cls_to_bin gives no bin for {', '.join(map(repr, empty))}: every class needs one")
        self.cls_to_bin = {name.strip(): bin_name.strip() for name, bin_name in cls_to_bin.items()}
        super().__init__(list(self.cls_to_bin), model_str, pretrained_str, **options)

    def _labels(self, names: list[str]) -> labels_lib.Labels:
        return labels_lib.binned_labels(self.model, {name: self.cls_to_bin[name] for name in names})

    def label_names(self) -> list:
        return sorted(self.cls_to_bin.items())
