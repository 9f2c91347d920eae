"""Which datasets an evaluation runs on, what they are called, and how results.json describes them.

An unnamed image folder called `images` takes its parent's name (held_out/images -> held_out);
a training run without a given dataset is evaluated on the held-out set its config.json names.
"""

from __future__ import annotations

import os

from etils import epath

from bioclip_jax.checkpoint.model_dir import CONFIG_JSON
from bioclip_jax.data.eval_sources import TAXA_FILE, EvalData, open_eval_data
from bioclip_jax.evaluate.config import recorded_eval
from bioclip_jax.paths import as_path

HELD_OUT_NAME = "held_out"  # the name a training run's held-out species go by in its results
GENERIC_FOLDER_NAMES = ("images", "imgs")  # such a folder is named after its parent (held_out/images -> held_out)


def dataset_specs(config) -> list[dict]:
    """The datasets to run: `config.datasets`, plus `config.data` when given."""
    specs = [dict(spec) for spec in config.datasets]
    if config.data:
        specs.append({"name": config.name, "data": config.data, "taxa": config.taxa, "label_key": config.label_key})
    if not specs:
        raise ValueError("no dataset: pass --data=folder:PATH|tfds:NAME[:SPLIT]|shards:PATTERN "
                         "or a config with datasets")
    for spec in specs:
        if not spec.get("data"):
            raise ValueError(f"dataset entry {spec} has no 'data' source")
    return specs


def recorded_held_out(workdir) -> dict:
    """The held-out set a training run scored itself on (its config.json's eval fields) as a dataset spec."""
    if not (epath.Path(workdir) / CONFIG_JSON).is_file():
        raise FileNotFoundError(f"{workdir} has no {CONFIG_JSON}: pass --data=folder:PATH")
    recorded = recorded_eval(workdir)
    folder = recorded.get("held_out_dir")
    if not folder:
        raise ValueError(f"the run in {workdir} recorded no held-out set (eval.held_out_dir): pass --data=...")
    if not as_path(folder).is_dir():
        raise FileNotFoundError(f"the held-out folder recorded by {workdir}/{CONFIG_JSON} is gone: {folder}; "
                                f"pass --data=folder:PATH")
    return {"name": HELD_OUT_NAME, "data": f"folder:{folder}", "taxa": recorded.get("taxa_file") or "",
            "label_key": ""}


def open_dataset(spec: dict, config) -> EvalData:
    """One dataset of the config; an unnamed image folder called `images` takes its parent's name."""
    data = open_eval_data(spec["data"], name=spec.get("name") or None, taxa=spec.get("taxa") or None,
                          label_key=spec.get("label_key") or None,
                          tfds_data_dir=config.tfds_data_dir or None, tfds_download=config.tfds_download)
    root = getattr(data, "root", None)
    if not spec.get("name") and root and data.name in GENERIC_FOLDER_NAMES:
        parent = os.path.basename(os.path.dirname(os.path.normpath(root)))
        data.name = parent or data.name
    return data


def describe_dataset(data: EvalData, spec: dict | None = None) -> dict:
    """Name, source and size of a dataset as results.json records it."""
    spec = spec or {}
    path = getattr(data, "root", None) or (getattr(data, "paths", None) or [None])[0]
    return {"name": data.name, "source": spec.get("data"), "path": _absolute(path), "taxa": _taxa_file(data, spec),
            "classes": len(data.classes), "images": len(data)}


def _taxa_file(data: EvalData, spec: dict) -> str | None:
    """The taxa.csv that gave the classes their taxonomy (given, or found beside the data)."""
    if not data.has_taxonomy:
        return None
    if spec.get("taxa"):
        return _absolute(spec["taxa"])
    root = getattr(data, "root", None) or os.path.dirname((getattr(data, "paths", None) or [""])[0])
    for folder in (as_path(root), as_path(root).parent) if root else ():
        if (folder / TAXA_FILE).is_file():
            return _absolute(os.fspath(folder / TAXA_FILE))
    return None


def _absolute(path) -> str | None:
    if path is None:
        return None
    text = str(path)
    return text if "://" in text else os.path.abspath(text)
