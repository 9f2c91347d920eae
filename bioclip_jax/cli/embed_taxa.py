"""`bioclip-jax embed-taxa`: the tree-of-life text-embedding matrix, in pybioclip's file layout.

    bioclip-jax embed-taxa --taxa catalog.csv --output DIR --pretrained local-dir:/models/bioclip

What is written, and how: bioclip_jax/taxa_embeddings.py.
"""

from __future__ import annotations

import sys
import time

from bioclip_jax import exit_codes
from bioclip_jax.cli import common
from bioclip_jax.pretrained import create_model
from bioclip_jax.taxa_embeddings import NAMES_FILE, read_catalog_taxa, write_taxa_embeddings
from bioclip_jax.taxonomy import TEXT_TYPES


def build_parser(prog: str = "bioclip-jax embed-taxa") -> common.ArgumentParser:
    parser = common.ArgumentParser(prog=prog, description="Embed every species of a taxa catalog for "
                                   "tree-of-life prediction (pybioclip's txt_emb_species.npy/.json layout).",
                                   renamed={"--out": "--output"})
    parser.add_argument("--taxa", required=True, help="catalog CSV with kingdom .. species (and common) columns")
    parser.add_argument("--output", required=True, help="output directory")
    common.add_model_args(parser)
    parser.add_argument("--text-type", dest="text_type", default="taxon_com", choices=TEXT_TYPES,
                        help="how each taxon is named (default taxon_com, BioCLIP's training caption)")
    parser.add_argument("--templates", default="openai", help="prompt templates: openai (80) or single")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=2048,
                        help="prompts per device batch (default 2048 = 25 taxa x 80 templates)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    return common.run_cli(_run, argv, "embed-taxa")


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    with common.reading_inputs():
        taxa, skipped = read_catalog_taxa(args.taxa, progress=args.progress)
        if not taxa:
            raise ValueError(f"{args.taxa}: no row names a genus and a species epithet")
        source = common.model_source(args.pretrained, args.model)
    if skipped:
        print(f"{args.taxa}: {skipped} rows without genus and species epithet skipped", file=sys.stderr)
    model = create_model(*source, seed=args.seed)
    start = time.perf_counter()
    path = write_taxa_embeddings(model, taxa, args.output, args.text_type, templates=args.templates,
                                 batch_size=args.batch_size, progress=args.progress)
    seconds = time.perf_counter() - start
    print(f"wrote {path} and {NAMES_FILE}: {len(taxa)} taxa in {seconds:.1f} s ({len(taxa) / seconds:.1f} names/s)")
    return exit_codes.FINISHED


if __name__ == "__main__":
    sys.exit(main())
