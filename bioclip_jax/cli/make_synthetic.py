"""`bioclip-jax make-synthetic`: writes the synthetic tree of life (TreeOfLife-10M layout).

    python -m bioclip_jax.cli.make_synthetic --output data/synthetic
    python -m bioclip_jax.cli.make_synthetic --output /tmp/tiny --species 24 --images-per-species 4
"""

from __future__ import annotations

import argparse
import os
import sys

from bioclip_jax import exit_codes
from bioclip_jax.cli.common import ArgumentParser
from bioclip_jax.synthetic.dataset import make_synthetic
from bioclip_jax.synthetic.generic_captions import write_generic_captions

_PARALLEL_FROM = 2000  # images; below this, starting worker processes costs more than it saves


def build_parser(prog: str = "bioclip-jax make-synthetic") -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        renamed={"--out": "--output"},
        description="Generate a synthetic tree of life: a random taxonomy with Latin-looking and "
        "common names, images whose traits follow the tree, written as TreeOfLife-10M webdataset "
        "shards (train/, val/), a held-out image folder of unseen species, catalog.csv and taxa.csv. "
        "The same seed gives byte-identical files.",
    )
    parser.add_argument("--output", dest="out", required=True, help="output directory")
    parser.add_argument("--species", type=int, default=200, help="number of species, held out included (default 200)")
    parser.add_argument("--images-per-species", type=int, default=40, help="images per species (default 40)")
    parser.add_argument("--held-out-species", type=float, default=0.1,
                        help="species kept out of train and val: a fraction if < 1, else a count (default 0.1)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of each training species' images that go to val/ (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes rendering images; 0 = one per CPU core (at most 8) for large "
                        "datasets, 1 for small ones (default 0); the output does not depend on it")
    parser.add_argument("--generic-captions", type=int, default=0, metavar="N",
                        help="also write N general image-caption pairs (.jpg + .txt) to OUT/generic/, a "
                             "stand-in for BioCLIP 2's LAION replay data (data.replay_shards)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    held_out = args.held_out_species
    if held_out >= 1 and held_out == int(held_out):
        held_out = int(held_out)  # a count
    workers = args.workers
    if workers == 0:
        large = args.species * args.images_per_species >= _PARALLEL_FROM
        workers = min(8, os.cpu_count() or 1) if large else 1
    try:
        summary = make_synthetic(
            args.out,
            species=args.species,
            images_per_species=args.images_per_species,
            held_out_species=held_out,
            seed=args.seed,
            image_size=args.image_size,
            val_fraction=args.val_fraction,
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            workers=workers,
        )
        generic = (write_generic_captions(os.path.join(args.out, "generic"), args.generic_captions,
                                          seed=args.seed, image_size=args.image_size,
                                          samples_per_shard=args.samples_per_shard, overwrite=args.overwrite)
                   if args.generic_captions else [])
    except (ValueError, FileExistsError) as error:  # a bad value, or a dataset already there without --overwrite
        print(f"error: {error}", file=sys.stderr)
        return exit_codes.USAGE
    c = summary.counts
    print(f"wrote {summary.out_dir} (seed {args.seed})")
    print(f"  species: {c['species']} ({c['train_species']} train, {c['held_out_species']} held out) in "
          f"{c['genera']} genera, {c['families']} families, {c['kingdoms']} kingdoms")
    print(f"  train/: {c['train_images']} images in {c['train_shards']} shards")
    print(f"  val/: {c['val_images']} images in {c['val_shards']} shards")
    print(f"  held_out/images/: {c['held_out_images']} images; held_out/taxa.csv")
    print("  catalog.csv, taxa.csv, info.json, README.md")
    if generic:
        print(f"  generic/: {args.generic_captions} image-caption pairs in {len(generic)} shards (replay data)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
