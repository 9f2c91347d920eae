"""`bioclip-jax check-data PATTERN` (or `--shards PATTERN`): read every sample once, report what training skips.

Prints the number of samples, how many are usable, the skipped ones by reason (the
same reasons and rules as the training pipeline, with example keys: captions that
are not valid UTF-8 count as corrupt_caption), damaged
shards, which caption types are present, and the number of distinct taxa per rank
(parsed from `taxonTag.txt`, else from a full seven-word `taxonomic_name.txt`).
With `--text-type T` a sample also needs the caption(s) T can choose; without it,
any one caption will do. Exit status 0 when at most --max-bad-fraction of the
samples are unusable and no shard is damaged, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bioclip_jax.cli.common import ArgumentParser, run_cli
from bioclip_jax.ingest.check_data import check_data, format_report, passes


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax check-data", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="*", metavar="SHARDS",
                        help="shard pattern(s), as --shards; several (e.g. a shell glob's files) are read together")
    parser.add_argument("--shards", default=None,
                        help="shard pattern, e.g. /data/train/shard-{000000..000159}.tar or "
                             "gs://bucket/train/shard-{000000..000159}.tar, a directory, globs, several "
                             "joined by '::', or .array_record files")
    parser.add_argument("--text-type", default=None,
                        help="caption type(s) training will use: a type, 'random', 'per_sample' or a mix")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--examples", type=int, default=5, help="sample keys shown per skip reason")
    parser.add_argument("--max-bad-fraction", type=float, default=0.01,
                        help="exit status 1 when more samples than this are unusable")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="reader threads")
    parser.add_argument("--cache-dir", default=None,
                        help="where to keep shard indexes of read-only data (a directory or gs:// prefix)")
    return parser


def _run(argv) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    shards = "::".join(([args.shards] if args.shards else []) + args.patterns)
    if not shards:
        parser.error("give the shards: bioclip-jax check-data PATTERN (or --shards PATTERN)")
    report = check_data(shards, args.text_type, args.examples, args.threads, args.cache_dir,
                        progress=sys.stderr.isatty() and not args.quiet)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if passes(report, args.max_bad_fraction) else 1


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
