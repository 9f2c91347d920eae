"""A resumed run is the same run: its config changes only in how it runs, unless asked otherwise.

The trainer writes WORKDIR/config.json at the first start. On every resume the current
config is compared with it, field by field (dotted names, e.g. `optimizer.lr`). A
difference in a field outside the allow-list below is refused with one line per field
(`field: saved -> now`) and the advice to pass `--allow-config-change` or to start a new
workdir: a changed batch size, learning rate, model or data would otherwise continue
silently as a different experiment under the old run's name.

Allowed without asking (`ALLOWED_CHANGES`):
  total_steps                  extend or shorten a run (the cosine schedule follows the new length)
  log_every_steps, device_peak_tflops                    logging and progress only
  hardware.*                   what `bioclip-jax plan` assumes
  eval.*                       periodic zero-shot eval: what, how often, batch size
  checkpoint.every_steps, checkpoint.keep, checkpoint.async_save    how often and how many
  data.workers, data.index_cache_dir                     how data is read, not which data
  data.max_bad_fraction        the tolerance for unusable samples, raised after a stop for bad data
  mesh.*, remat, scan_layers, attention   how the same computation is laid out on the devices
                               (restoring onto another mesh is supported)
  compilation_cache_dir, data.prefetch_to_device         where compiled steps are kept, how far ahead
                                                         batches are put on the devices
A field present on one side only (the code gained or lost a field since the run began)
counts as a change of that field.

With `--allow-config-change` every difference is accepted; `record_config_change` then
rewrites config.json with the current config and appends one line per resume to
WORKDIR/config_history.jsonl: {"step": N, "time": ..., "changes": {field: [saved, now]}}.
config.json thus always holds the config in force, and the history says how it got there;
a separate file keeps config.json a plain config (loadable as one) and is appended to.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json

import ml_collections
from etils import epath

from bioclip_jax import paths
from bioclip_jax.checkpoint.model_dir import CONFIG_JSON

HISTORY_JSONL = "config_history.jsonl"
ALLOWED_CHANGES = (
    "total_steps", "log_every_steps", "device_peak_tflops", "hardware.*", "eval.*",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.async_save",
    "data.workers", "data.index_cache_dir", "data.max_bad_fraction",
    "mesh.*", "remat", "scan_layers", "attention", "compilation_cache_dir", "data.prefetch_to_device",
)
_ABSENT = object()  # a field one side does not have


@dataclasses.dataclass(frozen=True)
class Change:
    field: str
    saved: object
    now: object

    @property
    def allowed(self) -> bool:
        return any(fnmatch.fnmatchcase(self.field, pattern) for pattern in ALLOWED_CHANGES)

    def __str__(self) -> str:
        return f"{self.field}: {_show(self.saved)} -> {_show(self.now)}"


def _show(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict, current: ml_collections.ConfigDict) -> list[Change]:
    """Every field whose value differs, compared as JSON (tuples and lists alike)."""
    before = flatten(saved)
    after = flatten(json.loads(current.to_json_best_effort()))
    return [Change(field, before.get(field, _ABSENT), after.get(field, _ABSENT))
            for field in sorted(before.keys() | after.keys())
            if before.get(field, _ABSENT) != after.get(field, _ABSENT)]


def check_resumed_config(saved: dict, current: ml_collections.ConfigDict, allow_changes: bool) -> list[Change]:
    """The changes from the saved config; raises ValueError for any outside ALLOWED_CHANGES unless allowed."""
    changes = config_changes(saved, current)
    refused = [change for change in changes if not change.allowed]
    if refused and not allow_changes:
        lines = "\n".join(f"  {change}" for change in refused)
        raise ValueError(f"the config differs from the one this workdir was started with (its {CONFIG_JSON}):\n"
                         f"{lines}\nrerun with the same config, pass --allow-config-change to continue this "
                         f"run under the new one, or start a new --workdir")
    return changes


def record_config_change(workdir, config: ml_collections.ConfigDict, changes: list[Change], step: int) -> None:
    """Makes config.json the config in force and appends the changes at `step` to config_history.jsonl."""
    workdir = epath.Path(workdir)
    entry = {"step": int(step),
             "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "changes": {c.field: [None if c.saved is _ABSENT else c.saved, None if c.now is _ABSENT else c.now]
                         for c in changes}}
    paths.append_line(workdir / HISTORY_JSONL, json.dumps(entry))
    paths.write_atomically(workdir / CONFIG_JSON, config.to_json_best_effort(indent=2))


def read_config_history(workdir) -> list[dict]:
    """The entries record_config_change wrote, oldest first."""
    return [json.loads(line) for line in paths.read_lines(epath.Path(workdir) / HISTORY_JSONL) if line]
