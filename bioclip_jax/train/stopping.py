"""When a run must stop early: SIGTERM, Ctrl-C, or a preemption notice, agreed by every process.

A stop saves a checkpoint and exits with `exit_codes.STOPPED`; it is not a finish.

- One process: SIGTERM and the first SIGINT set a flag that the loop reads after each
  step. A second SIGINT aborts at once (KeyboardInterrupt), for a user who does not
  want to wait for the save.
- Several processes: `jax.distributed` installs its own SIGTERM notifier (the preemption
  service: a notice on any host reaches all of them, and `reached_preemption_sync_point`
  names the same step everywhere). A Python SIGTERM handler would replace it, so none is
  installed; the loop asks the sync point every step, which costs no communication
  until a notice arrives. SIGINT stays a local flag that the processes share at the
  next logging step, where they exchange counters anyway (`StopVote`).
"""

from __future__ import annotations

import logging
import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


def jax_owns_sigterm() -> bool:
    """True when jax.distributed's preemption service listens for SIGTERM in this process."""
    from jax._src import distributed  # noqa: PLC0415 - the service's state has no public accessor
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class StopSignals:
    """Turns SIGTERM (unless JAX owns it) and the first SIGINT into `requested`; restores handlers on exit."""

    def __init__(self, handle_sigterm: bool | None = None):
        self.handle_sigterm = (not jax_owns_sigterm()) if handle_sigterm is None else handle_sigterm
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def __enter__(self) -> "StopSignals":
        wanted = [signal.SIGINT] + ([signal.SIGTERM] if self.handle_sigterm else [])
        for signum in wanted:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: the caller stops the run itself
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.reason == "SIGINT":
            raise KeyboardInterrupt("second Ctrl-C: aborted without saving")
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            if signum == signal.SIGINT and jax.process_index() == 0:
                # a warning, so that -q shows it too: it says how to abort
                log.warning("\nCtrl-C: saving a checkpoint and stopping "
                            "(press Ctrl-C again to abort without saving)")

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


class StopVote:
    """Whether the run stops, as every process agrees: the stop signals, shared at the logging steps.

    `exchange(local_skipped)` is the processes' one exchange of counters per logging step (an
    allgather): it returns the skipped-sample counts summed over processes and takes the vote,
    whether any process has been asked to stop. A lone process acts on its own signal at once.
    """

    def __init__(self, signals: StopSignals):
        self.signals = signals
        self._agreed = False

    @property
    def requested(self) -> bool:
        return self._agreed or (jax.process_count() == 1 and self.signals.requested)

    def exchange(self, local_skipped: np.ndarray) -> int:
        if jax.process_count() == 1:
            self._agreed |= self.signals.requested
            return int(local_skipped.sum())
        gathered = np.asarray(multihost_utils.process_allgather(np.append(local_skipped,
                                                                          np.int64(self.signals.requested))))
        self._agreed |= bool(gathered[:, -1].any())
        return int(gathered[:, :-1].sum())
