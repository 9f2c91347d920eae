"""`bioclip-jax convert-shards --in PATTERN --output DIR`: copy webdataset tar shards into ArrayRecord files.

One record per sample, in the order of the shards, `--records-per-file` per
`shard-%06d.array_record`. Training then takes `--shards DIR/*.array_record` (or
DIR) unchanged. Samples the tar reader cannot read (cut off by a truncation, or
in an unreadable shard) are left out and counted; images and captions are copied
as they are, so check-data and the training pipeline still judge them.
"""

from __future__ import annotations

import argparse
import sys

import tqdm

from bioclip_jax.cli.common import ArgumentParser, run_cli
from bioclip_jax.ingest.convert import convert_to_array_record
from bioclip_jax.data.tar_source import TarShardSource


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bioclip-jax convert-shards", description=__doc__, renamed={"--out": "--output"},
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--in", dest="shards", required=True,
                        help="tar shard pattern, e.g. /data/train/shard-{000000..000159}.tar "
                             "(or gs://...) or a directory")
    parser.add_argument("--output", dest="out", required=True,
                        help="output directory (or gs:// prefix) for the .array_record files")
    parser.add_argument("--records-per-file", type=int, default=10_000, help="samples per output file")
    parser.add_argument("--cache-dir", default=None,
                        help="where to keep shard indexes of read-only data (a directory or gs:// prefix)")
    return parser


def _run(argv) -> int:
    args = _parser().parse_args(argv)
    source = TarShardSource(args.shards, cache_dir=args.cache_dir)
    for problem in source.problems.values():
        print(f"warning: {problem}", file=sys.stderr)

    def progress(indices):
        return tqdm.tqdm(indices, desc="converting", unit="sample", disable=args.quiet or not sys.stderr.isatty())

    report = convert_to_array_record(source, args.out, args.records_per_file, progress=progress)
    print(f"wrote {report.written} samples from {len(source.shard_paths)} shards into "
          f"{len(report.paths)} files in {args.out}")
    for reason, count in report.dropped.items():
        print(f"left out {count} samples ({reason}), e.g. {', '.join(report.dropped_examples[reason])}")
    return 0 if report.written else 1


def main(argv=None) -> int:
    return run_cli(_run, argv)


if __name__ == "__main__":
    sys.exit(main())
