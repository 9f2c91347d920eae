"""`bioclip-jax predict`: pybioclip's predictions over a photo, a folder or a whole image archive.

    bioclip-jax predict bird.jpg                     # BioCLIP 2 over the tree of life, as `bioclip predict`
    bioclip-jax predict photos/ --model hf-hub:imageomics/bioclip --rank genus
    bioclip-jax predict photos/ --cls "crow,raven,rook"
    bioclip-jax predict photos/ --bins bins.csv      # pybioclip's class,bin CSV
    bioclip-jax predict a.jpg b.jpg --pretrained ... --taxa-embeddings tol/ --rank family --k 3
    bioclip-jax predict photos/ --pretrained ... --taxa-embeddings tol/ --subset ohio_birds.csv --format json
    bioclip-jax predict traps.csv --rank auto --confidence 0.8 --output answers.csv   # resumable; rerun to go on

Custom labels are embedded exactly as pybioclip's CustomLabelsClassifier does (80 OpenAI
templates, normalised mean), and scores are softmax(exp(logit_scale) * cosine), so the same
model gives the same probabilities. Tree-of-life mode scores every species of an embed-taxa
(or pybioclip) folder and, for a higher rank, sums the species probabilities above
--min-prob per taxon at that rank, as pybioclip does; `--rank auto` answers at the deepest rank
whose summed probability reaches --confidence (classify.open_set). `--subset` keeps only the taxa
listed in a CSV whose first column is named by a rank.

Inputs (data.image_inputs) stream: folders (searched recursively), CSV/TXT manifests of local or
gs:// paths, training shards, image files. With `--output FILE` in csv, jsonl or parquet, the run
is resumable: rows are appended as each batch finishes, unreadable images go to FILE's
`.skipped.csv` with the reason, and rerunning the same command continues after the last row
written (also after kill -9); a changed model, label set, rank or text type is refused. Under the
launch scripts every process takes its own slice of the inputs (whole shards, when there are
enough) and writes its own part; process 0 merges them at the end. Rows to stdout, or in
table/json format, are written as they come but do not resume.

With no model flag the model is pybioclip's default, hf-hub:imageomics/bioclip-2, and with
no labels its tree-of-life embeddings come from the dataset repo pybioclip pairs it with
(hub.TREE_OF_LIFE), through the Hugging Face cache. These two models are preprocessed as
pybioclip does (the whole image squashed to 224 x 224); any other model gets open_clip's
transform. Custom taxa (--taxa CSV without --taxa-embeddings) are embedded once per model,
catalog and text type, and kept under taxa_embeddings.taxa_cache_dir().
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from typing import IO

import jax
from jax.experimental import multihost_utils

from bioclip_jax import archive, console, exit_codes, hub
from bioclip_jax.classify import classifiers
from bioclip_jax.classify import labels as labels_lib
from bioclip_jax.classify.open_set import DEFAULT_CONFIDENCE
from bioclip_jax.cli import common
from bioclip_jax.cli.common import InputError
from bioclip_jax.compilation_cache import enable_compilation_cache
from bioclip_jax.data.image_inputs import ImageInputs, missing_sources
from bioclip_jax.inference import ImageEmbedder
from bioclip_jax.models.clip import CLIP
from bioclip_jax.outputs import rows as rows_output
from bioclip_jax.paths import as_path, open_text
from bioclip_jax.pretrained import create_model, pybioclip_preprocessing
from bioclip_jax.sources import SOURCES_HELP
from bioclip_jax.taxonomy import RANKS, TEXT_TYPES
from bioclip_jax.train.distributed import maybe_initialize_distributed

log = logging.getLogger(__spec__.name)  # not __name__: under `python -m` (the launch scripts) that is "__main__"

RESUMABLE_FORMATS = rows_output.FORMATS  # written to a file, these resume
FORMATS = (*RESUMABLE_FORMATS, "table", "json")


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
        elif self.fmt == "jsonl":
            self.stream.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
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
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively), CSV/TXT manifests "
                        "of image paths (local or gs://) and training shards (.tar, .array_record, patterns)")
    parser.add_argument("--path-column", dest="path_column",
                        help="the column of a CSV manifest that holds the image paths (default: the first named "
                             "path, filepath, file_path, file_name, filename, file, image or image_path)")
    parser.add_argument("--pretrained", help=SOURCES_HELP + f"; default {hub.DEFAULT_MODEL}")
    parser.add_argument("--model", help="architecture name for sources without one (e.g. ViT-B-16), or, as in "
                        "pybioclip, the model itself (hf-hub:imageomics/bioclip)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --pretrained random")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--cls", help="comma-separated labels, or a text file with one label per line")
    labels.add_argument("--cls-file", dest="cls_file", help="text file with one label per line")
    labels.add_argument("--bins", help="CSV with a header; first column a label, second the bin it is summed into")
    parser.add_argument("--rank", choices=(*RANKS, classifiers.AUTO), default="species",
                        help="tree-of-life rank (default species); auto: the deepest rank whose summed probability "
                             "reaches --confidence, one row per image with a `rank` column")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help=f"with --rank auto: the summed probability a rank must reach "
                             f"(default {DEFAULT_CONFIDENCE})")
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
    parser.add_argument("--format", choices=FORMATS,
                        help="output format (default: by --output's suffix, else csv); csv, jsonl and parquet "
                             "files resume")
    parser.add_argument("--output", help="write to this file instead of stdout ('stdout', as in pybioclip, is "
                        "stdout); rerun the same command to continue an interrupted run")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=32,
                        help="images per batch (default 32)")
    parser.add_argument("--workers", type=int, default=-1,
                        help="image decoders (default -1: the usable CPUs less one)")
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


def build_classifier(model: CLIP, args, names: list[str] | None) -> classifiers.Classifier:
    """The classifier the flags ask for; `names` are the already-read --cls/--cls-file labels, if any."""
    options = dict(batch_size=args.batch_size, progress=args.progress)
    if names is not None or args.bins:
        if args.subset or args.taxa or args.taxa_embeddings or args.rank != "species":
            raise ValueError("--cls/--cls-file/--bins cannot be combined with --rank, --taxa, --taxa-embeddings "
                             "or --subset")
        if args.bins:
            return classifiers.CustomLabelsBinningClassifier(labels_lib.read_bins(args.bins), model, **options)
        return classifiers.CustomLabelsClassifier(names, model, **options)
    return classifiers.TreeOfLifeClassifier(model, taxa_embeddings=args.taxa_embeddings, taxa=args.taxa,
                                            subset=args.subset, text_type=args.text_type, **options)


def _scorer_options(args, classifier: classifiers.Classifier) -> dict:
    if isinstance(classifier, classifiers.TreeOfLifeClassifier):
        return dict(rank=args.rank, k=args.k or 5, min_prob=args.min_prob, confidence=args.confidence)
    return dict(k=args.k)


def _identity(model: CLIP, args, classifier: classifiers.Classifier, options: dict) -> dict:
    """What made an output's rows: a resumed run must be the same, or it would mix two runs in one file."""
    return {**archive.model_identity(model, args.seed), "labels": classifier.labels_fingerprint(),
            "text_type": args.text_type if isinstance(classifier, classifiers.TreeOfLifeClassifier) else None,
            **options}


_SUFFIX_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet", ".json": "json"}  # any other suffix: csv


def _output_format(args) -> str:
    suffix = os.path.splitext(args.output or "")[1].lower()
    fmt = args.format or _SUFFIX_FORMATS.get(suffix, "csv")
    if fmt == "parquet" and not args.output:
        raise ValueError("--format parquet needs --output FILE.parquet (parquet cannot be streamed to stdout)")
    return fmt


class _NothingDone:
    """The output of a run that does not resume (rows to stdout, a table or a JSON array): the run's
    closing warning is its only list of skipped images."""

    done: frozenset[str] = frozenset()

    def skip(self, key: str, reason: str) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(_run, argv, "predict")


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    args.output = None if args.output == "stdout" else args.output
    if not args.output:
        console.keep_stdout_for_results()
    with common.reading_inputs():
        fmt = _output_format(args)
        _check_numbers(args)
        resumable = bool(args.output) and fmt in RESUMABLE_FORMATS
        missing = missing_sources(args.images)
        for path in missing:
            log.warning("image path not found, skipped: %s", path)
        sources = [s for s in args.images if s not in missing]
        if not sources:
            raise FileNotFoundError(f"no image files found in {', '.join(args.images)}")
        inputs = ImageInputs(sources, path_column=args.path_column)  # manifest and label mistakes are
        names = _class_names(args)  # reported before a model is fetched
        source = common.model_source(args.pretrained, args.model, default=hub.DEFAULT_MODEL)
    if maybe_initialize_distributed() and not resumable:
        raise InputError(f"several processes need --output FILE in one of {', '.join(RESUMABLE_FORMATS)} "
                         "(each writes its own part, merged at the end)")
    enable_compilation_cache()  # only the first run of a model and batch size compiles
    model = pybioclip_preprocessing(create_model(*source, seed=args.seed))
    with common.reading_inputs():
        classifier = build_classifier(model, args, names)
    embedder = ImageEmbedder(model, batch_size=args.batch_size, workers=args.workers, progress=False,
                             devices=jax.local_devices())
    options = _scorer_options(args, classifier)
    scorer = classifier.scorer(embedder.batch_size, **options)

    if resumable:
        identity = _identity(model, args, classifier, options)
        summary, skipped_where = _into_resumable_file(args, fmt, identity, embedder, scorer, inputs)
    else:
        summary, skipped_where = _into_stream(args, fmt, embedder, scorer, inputs), ""
    if jax.process_index() == 0:
        log.warning(summary.line() + skipped_where) if summary.skipped else log.info(summary.line())
    if missing:
        log.warning("%d image path(s) not found: %s", len(missing), ", ".join(missing))
    return exit_codes.ERROR if missing or (summary.skipped and not summary.images) else exit_codes.FINISHED


def _into_resumable_file(args, fmt: str, identity: dict, embedder: ImageEmbedder, scorer,
                         inputs: ImageInputs) -> tuple[archive.RunSummary, str]:
    """Rows appended to --output as made (one part per process, merged by process 0); resumes."""
    with common.reading_inputs():
        output = rows_output.RowsOutput(args.output, identity, fmt=fmt, rows_per_key=scorer.rows_per_image,
                                        process_index=jax.process_index(), process_count=jax.process_count())
    summary = archive.run_over_images(embedder, inputs, output,
                                      lambda keys, features: output.write(scorer.rows(keys, features)),
                                      progress=args.progress)
    output.close()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("predict: every part written")
        if jax.process_index() == 0:
            rows_output.merge_parts(args.output)
    return summary, f" (listed in {rows_output.skipped_path(args.output)})" if summary.skipped else ""


def _into_stream(args, fmt: str, embedder: ImageEmbedder, scorer, inputs: ImageInputs) -> archive.RunSummary:
    """Rows to stdout, or a table or JSON array to --output: written as they come, not resumable."""
    stream = open(args.output, "w", newline="", encoding="utf-8") if args.output else sys.stdout
    writer = RowWriter(stream, fmt)
    try:
        summary = archive.run_over_images(embedder, inputs, _NothingDone(),
                                          lambda keys, features: writer.write(scorer.rows(keys, features)),
                                          progress=args.progress)
        writer.close()
    finally:
        if args.output:
            stream.close()
    return summary


def _check_numbers(args) -> None:
    if (args.k is not None and args.k < 1) or args.batch_size < 1:
        raise ValueError(f"--k and --batch-size must be >= 1, got {args.k} and {args.batch_size}")
    if not 0.0 < args.confidence <= 1.0:
        raise ValueError(f"--confidence must be a probability in (0, 1], got {args.confidence}")
    if args.confidence != DEFAULT_CONFIDENCE and args.rank != classifiers.AUTO:
        raise ValueError("--confidence applies to --rank auto only")


if __name__ == "__main__":
    sys.exit(main())
