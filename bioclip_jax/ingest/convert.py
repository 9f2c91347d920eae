"""Copies tar shards into ArrayRecord files, one record per sample, in the format `data.array_record` reads.

ArrayRecord gives Grain native random access with no index to build, at the cost of this
one conversion pass. Output may go to gs:// (each file is written locally, then uploaded).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterable, Sequence

from array_record.python import array_record_module
from etils import epath

from bioclip_jax.data.array_record import encode_sample
from bioclip_jax.data.tar_source import ERROR
from bioclip_jax.paths import as_path, atomic_local_file, is_remote

FILE_NAME = "shard-{:06d}.array_record"
WRITER_OPTIONS = "group_size:1"  # one record per chunk: what Grain's random access wants


@dataclasses.dataclass
class ConversionReport:
    paths: list[str]
    written: int
    dropped: dict[str, int]
    dropped_examples: dict[str, list[str]]


def _write_file(path: epath.Path, records: Iterable[bytes]) -> None:
    """Appears under its name only once complete (the C++ writer needs a local file, also for gs://)."""
    with atomic_local_file(path) as temporary:
        writer = array_record_module.ArrayRecordWriter(temporary, WRITER_OPTIONS)
        try:
            for record in records:
                writer.write(record)
        finally:
            writer.close()


def convert_to_array_record(source: Sequence[dict[str, Any]], out_dir: str, records_per_file: int = 10_000,
                            progress: Callable[[Iterable], Iterable] = iter) -> ConversionReport:
    """Copies every readable sample of `source`, in order, into `shard-%06d.array_record` files.

    Samples the source could not read (truncated tar, unreadable shard) are dropped
    and counted; images and captions are copied as they are (the pipeline checks them).
    """
    if records_per_file <= 0:
        raise ValueError(f"records_per_file must be positive, got {records_per_file}")
    out = as_path(out_dir)
    if not is_remote(out):  # gs:// has no directories to make
        out.mkdir(parents=True, exist_ok=True)
    dropped: dict[str, int] = {}
    examples: dict[str, list[str]] = {}
    pending: list[bytes] = []
    paths: list[str] = []
    written = 0

    def flush() -> None:
        path = out / FILE_NAME.format(len(paths))
        _write_file(path, pending)
        paths.append(os.fspath(path))
        pending.clear()

    for index in progress(range(len(source))):
        sample = source[index]
        if ERROR in sample:
            dropped[sample[ERROR]] = dropped.get(sample[ERROR], 0) + 1
            examples.setdefault(sample[ERROR], []).append(sample["__key__"])
            continue
        pending.append(encode_sample(sample))
        written += 1
        if len(pending) == records_per_file:
            flush()
    if pending or not paths:
        flush()
    return ConversionReport(paths, written, dropped, {k: v[:5] for k, v in examples.items()})
