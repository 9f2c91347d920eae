"""`bioclip-jax predict`: pybioclip's predictions, streamed in batches over any number of images.

    bioclip-jax predict bird.jpg                     # BioCLIP 2 over the tree of life, as `bioclip predict`
    bioclip-jax predict photos/ --model hf-hub:imageomics/bioclip --rank genus
    bioclip-jax predict photos/ --cls "crow,raven,rook"
    bioclip-jax predict photos/ --bins bins.csv      # pybioclip's class,bin CSV
    bioclip-jax predict photos/ --pretrained local-dir:/models/bioclip --cls "crow,raven,rook"
    bioclip-jax predict a.jpg b.jpg --pretrained ... --taxa-embeddings tol/ --rank family --k 3
    bioclip-jax predict photos/ --pretrained ... --taxa-embeddings tol/ --subset ohio_birds.csv --format json

Custom labels are embedded exactly as pybioclip's CustomLabelsClassifier does (80 OpenAI
templates, normalised mean), and scores are softmax(exp(logit_scale) * cosine), so the same
model gives the same probabilities. Tree-of-life mode scores every species of an embed-taxa
(or pybioclip) folder and, for a higher rank, sums the species probabilities above
--min-prob per taxon at that rank, as pybioclip does. `--subset` keeps only the taxa listed in
a CSV whose first column is named by a rank. Rows are written as each batch finishes.

With no model flag the model is pybioclip's default, hf-hub:imageomics/bioclip-2, and with
no labels its tree-of-life embeddings come from the dataset repo pybioclip pairs it with
(hub.TREE_OF_LIFE), through the Hugging Face cache. These two models are preprocessed as
pybioclip does (the whole image squashed to 224 x 224); any other model gets open_clip's
transform. Custom taxa (--taxa CSV without --taxa-embeddings) are embedded once per model,
catalog and text type, and kept under taxa_embeddings.taxa_cache_dir().
"""

from __future__ import annotations

import csv
import functools
import json
import os
import sys
from typing import IO, Sequence

from bioclip_jax import console, exit_codes, hub, transforms
from bioclip_jax.classify import labels as labels_lib
from bioclip_jax.classify.scoring import Predictor
from bioclip_jax.compilation_cache import enable_compilation_cache
from bioclip_jax.cli import common
from bioclip_jax.data.image_items import ImageItem, list_image_files
from bioclip_jax.inference import ImageEmbedder, report_skipped
from bioclip_jax.models.clip import CLIP
from bioclip_jax.paths import as_path, open_text
from bioclip_jax.pretrained import create_model, pybioclip_preprocessing
from bioclip_jax.sources import SOURCES_HELP
from bioclip_jax.taxonomy import RANKS, TEXT_TYPES

FORMATS = ("csv", "table", "json")


class RowWriter:
    """CSV and JSON rows go out as they come; a table is aligned once all rows are known."""

    def __init__(self, stream: IO[str], fmt: str):
        self.stream, self.fmt = stream, fmt
        self._csv = None
        self._table: list[dict] = []
        self._first = True

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "table":
            self._table += rows
        elif self.fmt == "csv":
            for row in rows:
                if self._csv is None:
                    self._csv = csv.DictWriter(self.stream, fieldnames=list(row), lineterminator="\n")
                    self._csv.writeheader()
                self._csv.writerow(row)
        else:
            for row in rows:
                self.stream.write(("[\n" if self._first else ",\n") + json.dumps(row, ensure_ascii=False))
                self._first = False
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("[]\n" if self._first else "\n]\n")
        elif self.fmt == "table" and self._table:
            columns = list(self._table[0])
            cells = [[_format(row[c]) for c in columns] for row in self._table]
            widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
            self.stream.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
            for r in cells:
                self.stream.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
        self.stream.flush()


def _format(value) -> str:
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def build_parser(prog: str = "bioclip-jax predict") -> common.ArgumentParser:
    parser = common.ArgumentParser(prog=prog, renamed={"--out": "--output"},
                                   description="Classify images with a BioCLIP model, as pybioclip's `bioclip "
                                   "predict` does: over the tree of life (default), your own labels (--cls) or "
                                   "bins of labels (--bins).")
    parser.add_argument("images", nargs="+", help="image files and/or directories (searched recursively)")
    parser.add_argument("--pretrained", help=SOURCES_HELP + f"; default {hub.DEFAULT_MODEL}")
    parser.add_argument("--model", help="architecture name for sources without one (e.g. ViT-B-16), or, as in "
                        "pybioclip, the model itself (hf-hub:imageomics/bioclip)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --pretrained random")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--cls", help="comma-separated labels, or a text file with one label per line")
    labels.add_argument("--cls-file", dest="cls_file", help="text file with one label per line")
    labels.add_argument("--bins", help="CSV with a header; first column a label, second the bin it is summed into")
    parser.add_argument("--rank", choices=RANKS, default="species", help="tree-of-life rank (default species)")
    parser.add_argument("--taxa", help="taxa catalog CSV (kingdom .. species, common) for tree-of-life mode; "
                        "embedded once per model and text type, then cached")
    parser.add_argument("--taxa-embeddings", dest="taxa_embeddings",
                        help="folder with txt_emb_species.npy/.json (from embed-taxa or pybioclip); "
                             "built from --taxa when empty; default: the model's tree-of-life dataset repo")
    parser.add_argument("--subset", help="CSV whose first column (named by a rank) lists the taxa to keep")
    parser.add_argument("--text-type", dest="text_type", default="taxon_com", choices=TEXT_TYPES,
                        help="how taxa from --taxa are named when embedding them (default taxon_com)")
    parser.add_argument("--k", type=int, default=None,
                        help="predictions per image (default 5; every label with --cls/--bins, as pybioclip)")
    parser.add_argument("--min-prob", dest="min_prob", type=float, default=1e-9,
                        help="species probabilities at or below this are not summed into a rank (default 1e-9)")
    parser.add_argument("--format", choices=FORMATS, default="csv", help="output format (default csv)")
    parser.add_argument("--output", help="write to this file instead of stdout ('stdout', as in pybioclip, is stdout)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=32,
                        help="images per batch (default 32)")
    parser.add_argument("--workers", type=int, default=8, help="image decoding threads (default 8)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def _looks_like_path(text: str) -> bool:
    return "," not in text and (os.sep in text or "/" in text or text.lower().endswith((".txt", ".csv")))


def _class_names(args) -> list[str] | None:
    if args.cls is not None and not args.cls.strip():
        raise ValueError("--cls is empty: give comma-separated labels or a file with one label per line "
                         "(or leave --cls out to predict over the tree of life)")
    if args.cls_file and not as_path(args.cls_file).is_file():
        raise FileNotFoundError(f"label file not found: {args.cls_file}")
    source = args.cls_file or (args.cls if args.cls and as_path(args.cls).is_file() else None)
    if source:
        with open_text(source) as handle:
            names = [line.strip() for line in handle]
    elif args.cls:
        if _looks_like_path(args.cls):
            raise FileNotFoundError(f"--cls {args.cls}: no such label file (for a single label containing "
                                    f"'/', add a trailing comma)")
        names = [n.strip() for n in args.cls.split(",")]
    else:
        return None
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"no labels in {source or repr(args.cls)}")
    return labels_lib.unique_labels(names, source or "--cls")


def build_labels(model: CLIP, args, names: list[str] | None = None) -> labels_lib.Labels:
    """The labels to score; `names` are the already-read --cls/--cls-file labels, if any."""
    names = names if names is not None else _class_names(args)
    if names is not None or args.bins:
        if args.subset or args.taxa or args.taxa_embeddings or args.rank != "species":
            raise ValueError("--cls/--cls-file/--bins cannot be combined with --rank, --taxa, --taxa-embeddings "
                             "or --subset")
        if args.bins:
            return labels_lib.binned_labels(model, labels_lib.read_bins(args.bins))
        return labels_lib.custom_labels(model, names)
    features, taxa = labels_lib.load_tree_of_life(
        model, taxa_embeddings_dir=args.taxa_embeddings, taxa_catalog=args.taxa, text_type=args.text_type,
        subset=args.subset, progress=args.progress)
    return labels_lib.tree_of_life_labels(features, taxa, args.rank, args.min_prob)


def find_images(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """(image files, paths that do not exist): a missing path is reported, not fatal."""
    missing = [p for p in paths if not os.path.exists(p)]
    return list_image_files([p for p in paths if os.path.exists(p)]), missing


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(_run, argv, "predict")


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    args.output = None if args.output == "stdout" else args.output
    if not args.output:
        console.keep_stdout_for_results()
    with common.reading_inputs():
        if (args.k is not None and args.k < 1) or args.batch_size < 1:
            raise ValueError(f"--k and --batch-size must be >= 1, got {args.k} and {args.batch_size}")
        files, missing = find_images(args.images)
        for path in missing:
            print(f"predict: warning: image path not found, skipped: {path}", file=sys.stderr)
        if not files:
            raise FileNotFoundError(f"no image files found in {', '.join(args.images)}")
        names = _class_names(args)  # label mistakes are reported before a model is fetched
        source = common.model_source(args.pretrained, args.model, default=hub.DEFAULT_MODEL)
    enable_compilation_cache()  # only the first run of a model and batch size compiles
    model = pybioclip_preprocessing(create_model(*source, seed=args.seed))
    with common.reading_inputs():
        labels = build_labels(model, args, names)
    k = args.k or (5 if "classification" not in labels.groups[0] else len(labels.groups))
    embedder = ImageEmbedder(model, batch_size=args.batch_size, workers=args.workers, progress=args.progress)
    predictor = Predictor(model, labels, k, embedder.batch_size)
    stream = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    writer = RowWriter(stream, args.format)
    items = (ImageItem(f, functools.partial(transforms.open_rgb, f)) for f in files)
    try:
        for features, batch in embedder.stream(items, total=len(files)):
            writer.write(predictor.rows([item.key for item in batch], features))
        writer.close()
    finally:
        if args.output:
            stream.close()
    report_skipped(embedder.skipped)
    if missing:
        print(f"predict: {len(missing)} image path(s) not found: {', '.join(missing)}", file=sys.stderr)
    return exit_codes.FINISHED if not missing and len(embedder.skipped) < len(files) else exit_codes.ERROR


if __name__ == "__main__":
    sys.exit(main())
