"""What a failed storage call means, how long one may take, and how often to try it again.

A checkpoint that fails to read is one of four things, and only the first justifies
moving it out of the run:
- DAMAGED: the bytes are wrong or missing (a truncated or garbled file, a missing file of a
  committed step, undecodable JSON). Tensorstore says DATA_LOSS, OUT_OF_RANGE or NOT_FOUND.
- TRANSIENT: the storage did not answer (a network error, a timeout, throttling, an HTTP 5xx;
  tensorstore's UNAVAILABLE, DEADLINE_EXCEEDED, ...). Worth a few more tries, never a move.
- MISMATCH: the checkpoint reads but does not fit what is asked of it (a tree structure
  that differs): a config question, not damage.
- UNKNOWN: anything else. Not proof of damage, so nothing is moved either.

A call that can block runs under `bioclip_jax.deadlines.with_deadline`; `retrying` tries a
transient failure again, but never a call that ran out of time (it may still be running).
"""

from __future__ import annotations

import errno
import json
import re
import time
import zlib
from typing import Callable, Iterator, TypeVar

from bioclip_jax.deadlines import StorageTimeout

DAMAGED, TRANSIENT, MISMATCH, UNKNOWN = "damaged", "transient", "mismatch", "unknown"
RETRY_DELAYS_S = (2.0, 10.0)  # waits before the second and third try of a transient failure

_STATUS = re.compile(r"^\s*([A-Z][A-Z_]+): ")  # tensorstore / absl status codes open the message
_DAMAGE_STATUSES = {"DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND"}
_TRANSIENT_STATUSES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED", "CANCELLED"}
_DECODING = ("invalid json", "error decoding", "corrupt", "checksum")
_TRANSIENT_ERRNOS = {errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETUNREACH,
                     errno.ENETDOWN, errno.EHOSTUNREACH, errno.EAGAIN, errno.EIO, errno.ESTALE}
_MISMATCH_PHRASES = ("tree structures do not match", "tree structure mismatch", "dict key mismatch")

T = TypeVar("T")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _status(error: BaseException) -> str:
    match = _STATUS.match(str(error))
    return match.group(1) if match else ""


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, StorageTimeout):
        return True
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    if _status(error) in _TRANSIENT_STATUSES:
        return True
    module = type(error).__module__ or ""
    if module.startswith(("aiohttp", "requests", "urllib3", "google.auth", "google.api_core")):
        return True
    if module.startswith("gcsfs"):
        try:
            from gcsfs.retry import is_retriable  # noqa: PLC0415 - gcsfs is there when its error is
        except ImportError:
            return False
        return is_retriable(error)
    return False


def _is_damage(error: BaseException) -> bool:
    if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, zlib.error, FileNotFoundError)):
        return True
    if (type(error).__module__ or "").startswith("msgpack"):
        return True
    status = _status(error)
    if status in _DAMAGE_STATUSES:
        return True
    text = str(error).lower()
    if status in {"FAILED_PRECONDITION", "INVALID_ARGUMENT"} and any(word in text for word in _DECODING):
        return True
    return isinstance(error, KeyError) and "was not found in the checkpoint" in text


def classify(error: BaseException) -> str:
    """DAMAGED, TRANSIENT, MISMATCH or UNKNOWN, from the error and the errors it was raised from."""
    return explain(error)[0]


def explain(error: BaseException) -> tuple[str, BaseException]:
    """(what `classify` says, the error in the chain that decided it: the one worth quoting).

    A transient cause wins over damage: a failed download also leaves a file unread.
    """
    chain = list(_chain(error))
    for kind, test in ((TRANSIENT, _is_transient), (DAMAGED, _is_damage), (MISMATCH, _is_mismatch)):
        for candidate in chain:
            if test(candidate):
                return kind, candidate
    return UNKNOWN, error


def _is_mismatch(error: BaseException) -> bool:
    return any(phrase in str(error).lower() for phrase in _MISMATCH_PHRASES)


def retrying(call: Callable[[], T], on_retry: Callable[[BaseException, float], None] | None = None) -> T:
    """`call()`, tried again after RETRY_DELAYS_S when it fails transiently (a deadline is not retried:
    its call may still be running); the last error is raised as it is."""
    for delay in (*RETRY_DELAYS_S, None):
        try:
            return call()
        except Exception as error:  # classified, then raised again
            if delay is None or isinstance(error, StorageTimeout) or classify(error) != TRANSIENT:
                raise
            if on_retry is not None:
                on_retry(error, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
