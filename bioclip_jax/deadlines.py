"""Time limits on calls that can block, such as a storage request to a server that stopped answering.

A bucket whose endpoint takes connections and never answers makes gcsfs or tensorstore wait (and
retry) for a quarter of an hour or more; a call under `with_deadline` ends instead with one sentence
naming what it was doing. `BIOCLIP_JAX_STORAGE_TIMEOUT_S` sets the limit (default 600 s: ample for
reading a ViT-L train state from a bucket).
"""

from __future__ import annotations

import os
import threading
from typing import Callable, TypeVar

TIMEOUT_VARIABLE = "BIOCLIP_JAX_STORAGE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0

T = TypeVar("T")


class StorageTimeout(TimeoutError):
    """A storage call did not return within its deadline; the message names the path."""


def timeout_s() -> float:
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        return float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"environment variable {TIMEOUT_VARIABLE}={text!r} is not a number of seconds") from None


def with_deadline(call: Callable[[], T], seconds: float, what: str) -> T:
    """`call()`, or StorageTimeout("<what> did not finish within N s ...") once `seconds` pass.

    The call runs in a daemon thread: one that hangs in a storage client is left behind
    (it cannot be interrupted) and does not keep the process from exiting.
    """
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = error

    worker = threading.Thread(target=run, name=f"storage: {what}"[:60], daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise StorageTimeout(f"{what} did not finish within {seconds:.0f} s (the storage does not answer; "
                             f"{TIMEOUT_VARIABLE} sets this limit)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
