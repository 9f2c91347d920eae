"""TensorBoard scalars of a run, written where a failure can be named and bounded.

tensorboardX's SummaryWriter writes from a thread of its own (a full disk there ends in a thread's
traceback and lost events, or in an OSError out of any later flush) and, in a bucket, re-uploads the
whole events file through google-cloud-storage at every flush, with no time limit (a silent server
holds the run). This writer frames the same event records itself, in the caller's thread, under the
storage deadline (`deadlines`):
- locally, one events file, appended to and flushed at each call;
- in a bucket, where objects cannot be appended to, a new small events file every `upload_every_s`
  (and at close); TensorBoard reads every events file of a folder, in name order.
TensorBoard is a view of what metrics.jsonl holds, so a failure to write it does not stop a run: it
is said once, in one sentence naming the folder, and the run goes on without it.
"""

from __future__ import annotations

import io
import logging
import math
import os
import socket
import struct
import time
from typing import Mapping

from etils import epath

from bioclip_jax import deadlines, paths

log = logging.getLogger(__name__)

UPLOAD_EVERY_S = 60.0  # in a bucket: one new events object at most this often


def _record(data: bytes) -> bytes:
    """One TFRecord frame: length, its masked CRC, the data, its masked CRC."""
    from tensorboardX.record_writer import masked_crc32c  # noqa: PLC0415 - optional dependency

    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _event(step: int | None = None, values: Mapping[str, float] | None = None) -> bytes:
    """A scalars event, or with no values the file-version event an events file starts with."""
    from tensorboardX.proto import event_pb2, summary_pb2  # noqa: PLC0415 - optional dependency

    event = event_pb2.Event(wall_time=time.time())
    if values is None:
        event.file_version = "brain.Event:2"
    else:
        event.step = int(step)
        event.summary.CopyFrom(summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag=tag, simple_value=float(value)) for tag, value in values.items()]))
    return _record(event.SerializeToString())


def read_scalars(directory: paths.PathLike) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in a folder's events files, in file-name order (for tests and checks)."""
    from tensorboardX.proto import event_pb2  # noqa: PLC0415 - optional dependency

    found = []
    for path in sorted(epath.Path(directory).glob("events.out.tfevents.*")):
        stream = io.BytesIO(path.read_bytes())
        while header := stream.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            event = event_pb2.Event.FromString(stream.read(length))
            stream.read(4)
            found += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return found


class EventLog:
    """Scalars for TensorBoard in `directory` (local or gs://); `suffix` tells writers of one folder apart."""

    def __init__(self, directory: paths.PathLike, *, suffix: str = "", upload_every_s: float = UPLOAD_EVERY_S):
        self.directory = epath.Path(directory)
        self._remote = paths.is_remote(self.directory)
        self._name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._suffix, self._upload_every_s = suffix, upload_every_s
        self._pending: list[bytes] = []
        self._last_upload = time.monotonic()
        self._uploads = 0
        self._file = None
        self._failed = False
        try:
            import tensorboardX  # noqa: F401, PLC0415 - optional dependency
        except ImportError:
            log.warning("tensorboardX is not installed: TensorBoard events are not written (metrics.jsonl has "
                        "every value)")
            self._failed = True

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Logs the finite values of one step."""
        values = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._failed or not values:
            return
        self._pending.append(_event(step, values))
        if not self._remote or time.monotonic() - self._last_upload >= self._upload_every_s:
            self._write_pending()

    def close(self) -> None:
        if not self._failed:
            self._write_pending()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write_pending(self) -> None:
        if not self._pending:
            return
        what = f"writing TensorBoard events to {self.directory}"
        try:
            with paths.naming_the_file(self.directory):
                deadlines.with_deadline(self._upload if self._remote else self._append, deadlines.timeout_s(), what)
        except Exception as error:  # noqa: BLE001 - a full disk, a quota, an outage: said once, the run goes on
            self._failed = True
            log.warning("%s failed, so this run writes no more of them (metrics.jsonl still gets every value): %s",
                        what, error)
        self._pending = []

    def _append(self) -> None:
        if self._file is None:
            os.makedirs(self.directory, exist_ok=True)
            self._file = open(self.directory / (self._name + self._suffix), "ab")  # kept open: appended to at each call
            self._file.write(_event())
        self._file.write(b"".join(self._pending))
        self._file.flush()

    def _upload(self) -> None:
        name = f"{self._name}.{self._uploads:06d}{self._suffix}"
        (self.directory / name).write_bytes(_event() + b"".join(self._pending))
        self._uploads += 1
        self._last_upload = time.monotonic()
