"""The workdir of a run: proved writable before any work, and held by one job at a time.

`check_workdir` creates WORKDIR if needed and writes and deletes a probe file in it, so
that a read-only mount, a missing permission or a path that is a file fails in one line
before data is indexed or a model is built (rather than at the first checkpoint).

`hold_workdir` (a `WorkdirLock` taken by process 0, its outcome shared with all processes)
keeps two jobs from training into the same workdir, where they would overwrite each
other's checkpoints. Process 0 writes WORKDIR/LOCK (JSON: host, pid, start time, SLURM job
and restart count when under SLURM) and removes it on exit, also after an error. A second
job that finds the file refuses, naming the holder. A lock left behind by a job that died
without cleaning up is taken over, with a message, only when that is provably safe:
- the holder ran on this host and its pid is gone (or is now this process's, as after a
  container restart);
- the holder is an earlier incarnation of this same SLURM job (a requeue after a node
  failure: SLURM runs one incarnation of a job at a time, so the older one is gone);
- the file is empty or not a lock at all (a job that could not write it, on a full disk,
  left it): no live job has such a lock, since a lock appears with its contents.
A lock from another host is otherwise never taken over; the message says to delete it
once the user knows that job is dead.

Locally the lock is written to a file of its own and hard-linked to LOCK, which fails if
LOCK exists: creation is atomic and the lock appears whole (where hard links are not
supported, O_CREAT|O_EXCL then a write). On gs:// (etils.epath) there is no exclusive
create: the lock is looked for, written (an upload appears whole), then read back, which
misses only two jobs that start at the same instant.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import socket
import uuid

from etils import epath

from bioclip_jax import deadlines, paths

log = logging.getLogger(__name__)

LOCK_FILE = "LOCK"
UNREADABLE = "unreadable"  # the key of what `_read` makes of a lock file that holds no lock
_THIS_INTERPRETER = uuid.uuid4().hex  # tells a reused pid (container restart) from this very process


class WorkdirInUseError(RuntimeError):
    """Another job holds the workdir's lock."""


def _reason(error: BaseException) -> str:
    if getattr(error, "strerror", None):
        return error.strerror
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def check_workdir(workdir) -> epath.Path:
    """WORKDIR as an epath.Path, created if missing; raises ValueError or OSError with one sentence.

    A bucket whose server does not answer makes gcsfs retry for half a minute and then raise
    its own "Cannot connect ..."; the sentence names the workdir, and the storage deadline
    (bioclip_jax.deadlines) bounds each storage call here, as it does the lock's.
    """
    path = epath.Path(workdir)
    try:
        is_file = deadlines.with_deadline(lambda: path.exists() and not path.is_dir(), deadlines.timeout_s(),
                                          f"reaching workdir {path}")
    except Exception as error:  # noqa: BLE001 - an unreachable server, DNS, credentials: one message
        raise OSError(f"cannot reach workdir {path} ({_reason(error)}): check the path, the network and "
                      f"the credentials") from None
    if is_file:
        raise ValueError(f"workdir {path} is a file, not a directory: give a directory "
                         f"(a new one is created) or the workdir of an earlier run")
    probe = path / f".write-probe-{uuid.uuid4().hex}"

    def write_probe() -> None:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()

    try:
        deadlines.with_deadline(write_probe, deadlines.timeout_s(), f"writing a probe file into workdir {path}")
    except Exception as error:  # noqa: BLE001 - read-only mount, permissions, bucket ACL: one message
        raise OSError(f"cannot write to workdir {path} ({_reason(error)}): give a writable directory, "
                      f"or fix its permissions or mount") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def this_holder() -> dict:
    """Who would hold the lock if this process took it now."""
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "interpreter": _THIS_INTERPRETER,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if os.environ.get("SLURM_JOB_ID"):
        holder["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        holder["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return holder


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why `holder`'s lock is provably dead from `me`'s point of view, or None when it may be alive."""
    if UNREADABLE in holder:
        return (f"it is {holder[UNREADABLE]}, which no running job leaves (a job that failed to write it, "
                f"on a full disk say, does)")
    pid = holder.get("pid")
    if holder.get("host") == me["host"] and isinstance(pid, int):
        if pid == me["pid"] and holder.get("interpreter") != me["interpreter"]:  # a restarted container
            return f"its process id {pid} is now this process's"
        if not _pid_alive(pid):
            return f"its process {pid} on this host is gone"
    if (me.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]
            and int(holder.get("slurm_restart_count", 0)) < me["slurm_restart_count"]):
        return f"it is an earlier run of this SLURM job {me['slurm_job_id']}, which was requeued"
    return None


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds WORKDIR/LOCK for the block, or raises WorkdirInUseError."""

    def __init__(self, workdir):
        self.path = epath.Path(workdir) / LOCK_FILE
        self.holder = this_holder()

    def __enter__(self) -> "WorkdirLock":
        return deadlines.with_deadline(self._take, deadlines.timeout_s(), f"taking the lock {self.path}")

    def _take(self) -> "WorkdirLock":
        for _ in range(3):  # a takeover races another job at most a couple of times
            if self._create():
                return self
            holder = self._read()
            if holder is None:  # released (or unreadable) between our attempt and the read
                continue
            why = stale_reason(holder, self.holder)
            if why is None:
                raise WorkdirInUseError(self._refusal(holder))
            log.warning(f"taking over the lock {self.path} of {_describe(holder)}: {why}")
            if self._read() == holder:
                self.path.unlink(missing_ok=True)
        raise WorkdirInUseError(f"could not take the lock {self.path}: other jobs keep taking it; is another "
                                f"job starting in this workdir?")

    def __exit__(self, *exc) -> None:
        try:
            deadlines.with_deadline(self._release, deadlines.timeout_s(), f"removing the lock {self.path}")
        except Exception as error:  # noqa: BLE001 - never hide the run's own outcome behind this
            log.warning(f"warning: could not remove the lock {self.path} ({_reason(error)}); delete it before the "
                        f"next run")

    def _release(self) -> None:
        if self._read() == self.holder:  # never remove a lock another job took over
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        text = json.dumps(self.holder)
        with paths.naming_the_file(self.path):  # a full disk says which file it could not write
            if not paths.is_remote(self.path):
                return _create_whole(self.path, text)
            if paths.uncached(self.path).exists():
                return False
            self.path.write_text(text)
        return self._read() == self.holder  # another job wrote in between: theirs wins

    def _read(self) -> dict | None:
        """The holder; None when there is no lock; {UNREADABLE: why} for a file that holds no lock."""
        try:
            text = paths.uncached(self.path).read_text()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as error:
            return {UNREADABLE: f"unreadable ({_reason(error)})"}
        if not text.strip():
            return {UNREADABLE: "empty"}
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        return holder if isinstance(holder, dict) else {UNREADABLE: "not a lock (no JSON object)"}

    def _refusal(self, holder: dict) -> str:
        return (f"workdir {self.path.parent} is in use by {_describe(holder)} (lock file {self.path}); "
                f"wait for that job, or use another --workdir. If you know that job is dead, delete "
                f"{self.path} and rerun")


def _create_whole(path: epath.Path, text: str) -> bool:
    """Creates the local file `path` holding `text`, atomically and only if it does not exist."""
    own = path.parent / f".{path.name}.{uuid.uuid4().hex}"
    try:
        own.write_text(text)
        try:
            os.link(own, path)
            return True
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
        try:  # no hard links here (some FUSE mounts): an exclusive create, then the write
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return True
    finally:
        own.unlink(missing_ok=True)


def _describe(holder: dict) -> str:
    if UNREADABLE in holder:
        return "no job"
    started = f", started {holder['started']}" if holder.get("started") else ""
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"process {holder.get('pid')} on host {holder.get('host')}{started}{job}"


@contextlib.contextmanager
def hold_workdir(workdir):
    """WorkdirLock held by process 0 for the block; when it is refused, every process raises.

    The other processes must learn of a refusal: left running, they would wait in their
    first collective for a process 0 that has exited.
    """
    import jax  # noqa: PLC0415 - only callers that train need it
    with contextlib.ExitStack() as stack:
        refusal = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(WorkdirLock(workdir))
            except WorkdirInUseError as error:
                refusal = error
        if jax.process_count() > 1:
            import numpy as np  # noqa: PLC0415
            from jax.experimental import multihost_utils  # noqa: PLC0415
            refused = bool(multihost_utils.broadcast_one_to_all(np.asarray(refusal is not None)))
            if refused and refusal is None:
                refusal = WorkdirInUseError(f"process 0 could not lock workdir {workdir}; its error says why")
        if refusal is not None:
            raise refusal
        yield
