"""Prediction rows of an archive run, written as they are made, so that a killed run resumes where it stopped.

Files, for `--output preds.csv`:
- `preds.csv`: the rows. One process appends to it directly (`tail -f` shows them); with several,
  each appends to its own `preds.csv.parts/process-00001-of-00004.csv`, and `merge_parts` joins
  them into `preds.csv` at the end. Parquet cannot be appended to: its rows are staged as jsonl
  parts (always, even for one process) and the .parquet is written whole, at once, by `merge_parts`.
- `preds.skipped.csv` (file_name, reason): the images that could not be read, per process alike.
- `preds.csv.run.json`: the run's identity (model, labels, rank, k, ...). Reopening with another
  identity is refused rather than mixing two runs' rows in one file.

A kill -9 may leave a half line, or the first of an image's k rows, at the end of a file; reopened,
those are cut off and the image answered again. `done` holds the images already answered in full, or
skipped, by earlier runs, in every file and part present, whatever their process count was.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
from typing import Iterator

from bioclip_jax.outputs import records
from bioclip_jax.outputs.records import KEY_FIELD, AppendLog
from bioclip_jax.outputs.run_record import OutputSummary, check_or_record, remove_if_empty, require_local
from bioclip_jax.paths import atomic_local_file, read_json

log = logging.getLogger(__name__)

FORMATS = ("csv", "jsonl", "parquet")
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
SKIPPED_COLUMNS = (KEY_FIELD, "reason")
_PARQUET_CHUNK_ROWS = 65536


def output_format(path: str, fmt: str | None = None) -> str:
    """The format asked for, or the one `path`'s suffix names (.csv, .jsonl or .json lines, .parquet)."""
    if fmt is None:
        fmt = _SUFFIXES.get(os.path.splitext(path)[1].lower())
        if fmt is None:
            raise ValueError(f"cannot tell the format of {path} from its suffix; name it .csv, .jsonl or .parquet, "
                             f"or give the format")
    if fmt not in FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401, PLC0415 - optional: only parquet outputs need it
        except ImportError:
            raise ValueError(f"writing {path} as parquet needs pyarrow: pip install pyarrow, or write csv or "
                             f"jsonl") from None
    return fmt


def parts_dir(path: str) -> str:
    return path + ".parts"


def part_name(process_index: int, process_count: int) -> str:
    return f"process-{process_index:05d}-of-{process_count:05d}"


def run_record_path(path: str) -> str:
    return path + ".run.json"


def skipped_path(path: str) -> str:
    """`preds.csv` -> `preds.skipped.csv`."""
    return os.path.splitext(path)[0] + ".skipped.csv"


def _row_parts(path: str, fmt: str) -> list[str]:
    suffix = "jsonl" if fmt == "parquet" else fmt
    found = glob.glob(os.path.join(glob.escape(parts_dir(path)), f"process-*.{suffix}"))
    return sorted(name for name in found if not name.endswith(".skipped.csv"))


def _skipped_parts(path: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(parts_dir(path)), "process-*.skipped.csv")))


def _parquet_keys(path: str) -> list[str]:
    import pyarrow.parquet as pq  # noqa: PLC0415 - optional: only parquet outputs need it

    if not os.path.exists(path):
        return []
    return [str(key) for key in pq.read_table(path, columns=[KEY_FIELD]).column(KEY_FIELD).to_pylist()]


class RowsOutput:
    """Where one process writes an archive run's rows and skipped images; see the module docstring.

    `rows_per_key`: how many rows every image gets (k, or fewer when there are fewer labels); an image
    with fewer at the end of a file is taken for one a crash cut short.
    """

    def __init__(self, path: str, identity: dict, *, fmt: str | None = None, rows_per_key: int = 1,
                 process_index: int = 0, process_count: int = 1):
        require_local(path)
        if rows_per_key < 1:
            raise ValueError(f"rows_per_key must be at least 1, got {rows_per_key}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process {process_index} of {process_count} does not exist")
        self.path, self.rows_per_key = os.path.abspath(path), rows_per_key
        self.fmt = output_format(path, fmt)
        self.process_index, self.process_count = process_index, process_count
        existing = [p for p in (self.path, skipped_path(self.path), parts_dir(self.path)) if os.path.exists(p)]
        recorded = {**identity, "output_format": self.fmt, "rows_per_key": rows_per_key}
        check_or_record(run_record_path(self.path), recorded, self.path, bool(existing))

        own = part_name(process_index, process_count)
        alone = process_count == 1 and self.fmt != "parquet"
        rows_file = self.path if alone else os.path.join(parts_dir(self.path), f"{own}.{self._line_format}")
        skipped_file = skipped_path(self.path) if process_count == 1 else os.path.join(
            parts_dir(self.path), f"{own}.skipped.csv")
        self._rows = AppendLog(rows_file, self._line_format, rows_per_key)
        self._skipped = AppendLog(skipped_file, "csv")
        self.done = self._keys_done()
        self.summary = OutputSummary(already_done=len(self.done))

    @property
    def _line_format(self) -> str:
        return "jsonl" if self.fmt == "parquet" else self.fmt

    def _keys_done(self) -> set[str]:
        done = set(self._rows.keys) | set(self._skipped.keys)
        if self.fmt == "parquet":
            done.update(_parquet_keys(self.path))
        elif self._rows.path != self.path:
            done.update(records.whole_keys(self.path, self.fmt, self.rows_per_key))
        for part in _row_parts(self.path, self.fmt):
            if part != self._rows.path:
                done.update(records.whole_keys(part, self._line_format, self.rows_per_key))
        for part in [skipped_path(self.path)] + _skipped_parts(self.path):
            if part != self._skipped.path:
                done.update(records.whole_keys(part, "csv"))
        return done

    def pending(self, keys: list[str]) -> list[str]:
        """This process's share of `keys` (every process_count-th, from its index), less those done. Split
        first, filter after: every process then agrees on the split, whatever each found done."""
        return [key for key in keys[self.process_index::self.process_count] if key not in self.done]

    def write(self, rows: list[dict]) -> None:
        """Appends the rows of whole images (rows_per_key each, an image's rows together) in one write."""
        counts: dict[str, int] = {}
        previous = None
        for row in rows:
            key = row.get(KEY_FIELD)
            if key is None:
                raise ValueError(f"a row written to {self.path} has no {KEY_FIELD}: {row}")
            if key != previous and key in counts:
                raise ValueError(f"the rows of {key} are not together in the batch written to {self.path}")
            counts[key], previous = counts.get(key, 0) + 1, key
        short = [key for key, count in counts.items() if count != self.rows_per_key]
        if short:
            raise ValueError(f"{short[0]} has {counts[short[0]]} rows, but {self.path} takes {self.rows_per_key} "
                             f"per image")
        again = [key for key in counts if key in self.done]
        if again:
            log.warning("%d images were answered by an earlier run already (e.g. %s); their rows are left out",
                        len(again), again[0])
            rows = [row for row in rows if row[KEY_FIELD] not in self.done]
        self._rows.append(rows)
        self.summary.answered += len(counts) - len(again)

    def skip(self, key: str, reason: str) -> None:
        """Records an image that could not be answered (unreadable, say), and why; it counts as done."""
        self._skipped.append([{KEY_FIELD: key, "reason": reason}])
        self.summary.skipped += 1

    def close(self) -> None:
        """Makes everything written durable; a single process also builds the final file (merge_parts)."""
        self._rows.close()
        self._skipped.close()
        if self.process_count == 1:
            merge_parts(self.path)


def merge_parts(path: str) -> None:
    """The parts of every process become `path` (header once), written at once; run by process 0 after every
    process closed. Parts of earlier runs with other process counts are merged too; without parts, a csv or
    jsonl `path` is left as it is. A merge cut short is merged again without repeating a row."""
    path = os.path.abspath(path)
    require_local(path)
    if not os.path.exists(run_record_path(path)):
        return  # no run wrote here
    recorded = read_json(run_record_path(path))
    fmt, rows_per_key = recorded["output_format"], recorded["rows_per_key"]
    row_parts, skipped_parts = _row_parts(path, fmt), _skipped_parts(path)
    if fmt == "parquet":
        if row_parts or not os.path.exists(path):
            _write_parquet(path, row_parts, rows_per_key)
    elif row_parts:
        records.concatenate([path] + row_parts, path, fmt, rows_per_key)
    if skipped_parts:
        records.concatenate([skipped_path(path)] + skipped_parts, skipped_path(path), "csv")
    if os.path.isdir(parts_dir(path)):
        for part in row_parts + skipped_parts:
            os.remove(part)
        shutil.rmtree(parts_dir(path), ignore_errors=True)
    remove_if_empty(skipped_path(path))


def _parquet_sources(path: str, parts: list[str], rows_per_key: int) -> Iterator[list[dict]]:
    """Chunks of rows: the existing .parquet's, then the whole images of each staged jsonl part, none twice."""
    import pyarrow.parquet as pq  # noqa: PLC0415 - optional: only parquet outputs need it

    seen: set[str] = set()
    if os.path.exists(path):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_CHUNK_ROWS):
            rows = batch.to_pylist()
            seen.update(str(row[KEY_FIELD]) for row in rows)
            yield rows
    for part in parts:
        chunk: list[dict] = []
        with records.locked(part, "rb") as handle:
            for whole in records.Scan(handle, "jsonl", rows_per_key, part):
                if whole.key in seen:
                    continue
                seen.add(whole.key)
                chunk += [json.loads(line) for line in whole.raw.decode("utf-8").splitlines()]
                if len(chunk) >= _PARQUET_CHUNK_ROWS:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def _write_parquet(path: str, parts: list[str], rows_per_key: int) -> None:
    """Parquet cannot be appended to: the whole file is written anew, streamed chunk by chunk, then renamed."""
    import pyarrow as pa  # noqa: PLC0415 - optional: only parquet outputs need it
    import pyarrow.parquet as pq  # noqa: PLC0415 - optional: only parquet outputs need it

    writer, schema = None, None
    with atomic_local_file(path) as temporary:
        try:
            for rows in _parquet_sources(path, parts, rows_per_key):
                if schema is None:
                    schema = pa.Table.from_pylist(rows).schema
                    writer = pq.ParquetWriter(temporary, schema)
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            if writer is None:  # no rows at all: an empty table with the key column
                pq.write_table(pa.table({KEY_FIELD: pa.array([], pa.string())}), temporary)
        finally:
            if writer is not None:
                writer.close()
