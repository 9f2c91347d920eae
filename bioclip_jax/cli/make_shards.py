"""`bioclip-jax make-shards`: your own labelled images -> TreeOfLife-layout shards + a held-out eval set.

    bioclip-jax make-shards --folder photos/ --taxa photos/taxa.csv --output data/mine
    bioclip-jax make-shards --csv labels.csv --output data/mine --held-out-images 0.2

Writes, under --output:
    train/shard-000000.tar ...  webdataset shards: .jpg + the ten caption members of TreeOfLife-10M
                                (sci, com, taxon, taxonTag, sci_com, taxon_com, taxonTag_com, names)
    held_out/images/<class>/    images kept out of training (--held-out-images / --held-out-classes)
    held_out/taxa.csv           their taxonomy, for zero-shot with any text type and per-rank scores
    taxa.csv, catalog.csv       every class; every image with its split, sample key and source path
    skipped.csv, info.json      what was left out and why; counts and parameters

Copies of one image (same bytes) are kept once, before the split; the others are listed in
skipped.csv. --output may not contain an input or sit inside the image folder.

Then it reads the shards back as training will (`check-data`), which also writes their
indexes, and prints the fine-tuning command. Exit status 1 when the shards fail that check.
"""

from __future__ import annotations

import argparse
import os
import sys

from bioclip_jax import exit_codes
from bioclip_jax.cli.common import ArgumentParser, run_cli
from bioclip_jax.ingest import collection as collection_lib
from bioclip_jax.ingest.check_data import check_data, format_report, passes
from bioclip_jax.ingest.make_shards import finetune_command, make_shards, summary


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax make-shards", description=__doc__, renamed={"--out": "--output"},
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="image folder with one sub-folder per class (needs a taxa.csv)")
    source.add_argument("--csv", help="table with an image path column and kingdom .. species, common")
    parser.add_argument("--taxa", default=None,
                        help="taxa.csv naming each class folder (columns class_name, kingdom, phylum, class, "
                             "order, family, genus, species, common); default: FOLDER/taxa.csv or next to it")
    parser.add_argument("--image-root", default=None, help="base of relative paths in --csv (default: its folder)")
    parser.add_argument("--output", dest="out", required=True, help="output directory")
    parser.add_argument("--held-out-images", type=float, default=0.1,
                        help="fraction of each class's images kept for the held-out eval (default 0.1)")
    parser.add_argument("--held-out-classes", type=float, default=0.0,
                        help="whole classes kept out of training, for zero-shot on unseen taxa: a fraction if "
                             "< 1, else a count (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the shard order (default 0)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="images per tar shard (default 1000)")
    parser.add_argument("--resize", type=int, default=0,
                        help="re-encode images whose shorter side exceeds this many pixels (default 0: keep)")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="reader threads")
    parser.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _run(argv) -> int:
    args = build_parser().parse_args(argv)
    if args.folder:
        found = collection_lib.read_folder_collection(args.folder, args.taxa)
    else:
        found = collection_lib.read_table_collection(args.csv, args.image_root)
    counts = make_shards(found, args.out, held_out_images=args.held_out_images,
                         held_out_classes=args.held_out_classes, seed=args.seed,
                         samples_per_shard=args.samples_per_shard, resize=args.resize, threads=args.threads,
                         overwrite=args.overwrite, progress=not args.no_progress)
    print(summary(counts, args.out))
    print("checking the shards as training reads them (check-data) ...", flush=True)
    report = check_data(os.path.join(args.out, "train"), threads=args.threads, progress=not args.no_progress)
    print(format_report(report))
    if not passes(report):
        print(f"error: check-data found problems in {args.out}/train (above)", file=sys.stderr)
        return 1
    print(f"\nfine-tune with:\n  {finetune_command(args.out, counts['held_out_images'] > 0)}")
    return 0


def main(argv=None) -> int:
    try:
        return run_cli(_run, argv)
    except FileExistsError as error:  # outputs already there without --overwrite: a usage error
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE


if __name__ == "__main__":
    sys.exit(main())
