"""What makes an output resumable: the run it belongs to (a sidecar JSON), and what a run added to it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from bioclip_jax.paths import is_remote, read_json, write_atomically


@dataclasses.dataclass
class OutputSummary:
    """Images this run answered, those it skipped (unreadable), and those an earlier run had already done."""

    answered: int = 0
    skipped: int = 0
    already_done: int = 0


def fingerprint(value) -> str:
    """A short, stable hash of a JSON-able value: how an identity records what is too large to store whole
    (a label list, a model's architecture)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def require_local(path: str) -> None:
    if is_remote(path):
        raise ValueError(f"{path} is in a bucket, and resumable outputs are written to local paths only for now; "
                         f"write to a local --output and copy it up when the run ends")


def remove_if_empty(path: str) -> None:
    """A run that skipped nothing leaves no skipped file behind."""
    if os.path.exists(path) and os.path.getsize(path) == 0:
        os.remove(path)


def _as_json(value):
    return json.loads(json.dumps(value))


def _first_difference(recorded: dict, identity: dict) -> str | None:
    for field in list(recorded) + [f for f in identity if f not in recorded]:
        if recorded.get(field, "(none)") != identity.get(field, "(none)"):
            return (f"its {field} was {json.dumps(recorded.get(field, '(none)'))} and is now "
                    f"{json.dumps(identity.get(field, '(none)'))}")
    return None


def check_or_record(sidecar: str, identity: dict, output: str, output_exists: bool) -> None:
    """Resumes an output of the same run, starts a fresh one, and refuses to mix two runs in one file.

    `output_exists`: some of the output's files are already there. Without them the sidecar is
    (re)written: the user removed the output, so a run starts over.
    """
    identity = _as_json(identity)
    if not output_exists:
        os.makedirs(os.path.dirname(sidecar), exist_ok=True)
        write_atomically(sidecar, json.dumps(identity, indent=1, sort_keys=False) + "\n")
        return
    if not os.path.exists(sidecar):
        raise ValueError(f"{output} already exists and no resumable run wrote it (there is no {sidecar}); "
                         f"choose another --output, or remove it to start over")
    difference = _first_difference(read_json(sidecar), identity)
    if difference:
        raise ValueError(f"{output} holds the results of another run ({difference}), so this run will not add "
                         f"to it; choose another --output, or remove the old one to start over")
