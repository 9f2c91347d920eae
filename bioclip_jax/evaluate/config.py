"""What an evaluation runs: the config schema, its defaults, and the checks made before any work.

A training run is evaluated as it recorded itself in WORKDIR/config.json: with its text types
(eval.text_type) unless `text_type` is set, on its held-out set unless a dataset is given
(evaluate/datasets.py).
"""

from __future__ import annotations

import json

import ml_collections
from etils import epath

from bioclip_jax.checkpoint.model_dir import CONFIG_JSON
from bioclip_jax.taxonomy import RANKS, check_text_type
from bioclip_jax.taxonomy.templates import get_templates

TASKS = ("zero_shot", "few_shot", "linear_probe")
DEFAULT_TEXT_TYPE = "taxon_com"  # how the paper scores BioCLIP


def default_config() -> ml_collections.ConfigDict:
    """Every field the evaluation reads; config files start from this and change what they need."""
    config = ml_collections.ConfigDict()
    config.pretrained = ""  # any source create_model accepts, or "random"
    config.model = ""  # architecture name, for sources that carry none (a .safetensors state dict)
    config.workdir = ""  # a training run: its latest checkpoint, or every new one with watch
    config.watch = False
    config.poll_seconds = 60.0
    config.watch_timeout = 3600.0  # stop watching after this long without a new checkpoint
    config.datasets = []  # [{"name", "data", "taxa", "label_key"}]; or use `data` for one dataset
    config.data = ""
    config.name = ""
    config.taxa = ""
    config.label_key = ""
    config.tasks = "zero_shot,few_shot"
    config.text_type = ""  # a comma list scores zero-shot once per text type; "": the run's, else taxon_com
    config.templates = "openai"
    config.shots = (1, 5)
    config.trials = 5
    config.linear_probe_steps = 300
    config.batch_size = 64
    config.text_batch_size = 256
    config.workers = -1  # image decoder threads; -1: one per usable CPU beyond the one that feeds the device
    config.out = ""  # results.json path; "": WORKDIR/eval/<step>/results.json, else ./results.json
    config.plot = True
    config.plot_embeddings = ""  # a rank, e.g. "family": PCA of image embeddings coloured by it
    config.tfds_data_dir = ""
    config.tfds_download = False
    config.progress = True
    return config


def parse_tasks(tasks: str) -> tuple[str, ...]:
    chosen = tuple(t.strip() for t in str(tasks).split(",") if t.strip())
    unknown = [t for t in chosen if t not in TASKS]
    if unknown or not chosen:
        raise ValueError(f"unknown task(s) {unknown or tasks!r}; valid: {', '.join(TASKS)}")
    return chosen


def parse_text_types(text_type: str) -> list[str]:
    """"taxon_com,com" -> ["taxon_com", "com"] (each one checked)."""
    types = [t.strip() for t in str(text_type).split(",") if t.strip()]
    if not types:
        raise ValueError(f"no text type in {text_type!r}")
    for text_type_ in types:
        check_text_type(text_type_)
    return types


def recorded_eval(workdir) -> dict:
    """The eval fields of a training run's config.json ({} when it has none)."""
    config_path = epath.Path(workdir) / CONFIG_JSON
    return json.loads(config_path.read_text()).get("eval", {}) if config_path.is_file() else {}


def fill_defaults(config) -> None:
    """The text types a config leaves open: the training run's (config.json eval.text_type), else taxon_com."""
    if not config.text_type:
        recorded = recorded_eval(config.workdir).get("text_type") if config.workdir else None
        config.text_type = recorded or DEFAULT_TEXT_TYPE


def check_config(config) -> None:
    fill_defaults(config)
    parse_tasks(config.tasks)
    parse_text_types(config.text_type)
    get_templates(config.templates)
    if config.plot_embeddings and config.plot_embeddings not in RANKS:
        raise ValueError(f"--plot-embeddings must be a rank ({', '.join(RANKS)}), got {config.plot_embeddings!r}")
    if config.trials < 1 or any(int(k) < 1 for k in config.shots):
        raise ValueError(f"trials and shots must be >= 1, got trials={config.trials}, shots={tuple(config.shots)}")
