"""Runs the evaluation tasks of a config on a model: every dataset embedded once, then scored.

`evaluate(model, config)` opens each dataset (a missing one is reported and skipped),
streams its images through the model once, and scores zero-shot (once per text type of
`text_type`, a comma list), few-shot, linear probe and per-rank metrics on the stored
embeddings. `write_results` writes results.json (with what the numbers are of: model
source and step, text types, templates, dataset name and path), results.md and
results.png, and says which earlier ones it replaced; the training job's final held-out
evaluation uses the same functions. `watch(workdir, config)` does the same for every new
checkpoint of a training run and logs to the run's metrics.jsonl and TensorBoard, so
evaluation can run on other hardware beside training.

A training run is evaluated as it recorded itself in WORKDIR/config.json: on its held-out
set (eval.held_out_dir) unless a dataset is given, with its text types (eval.text_type)
unless `text_type` is set, and its results go to WORKDIR/eval/<step>/ unless `out` is set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Callable

import ml_collections
import numpy as np
from etils import epath

from bioclip_jax import paths
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.data import shard_index
from bioclip_jax.data.eval_sources import TAXA_FILE, EvalData, open_eval_data
from bioclip_jax.evaluate import few_shot, per_rank, plots, results, zero_shot
from bioclip_jax.taxonomy.templates import get_templates
from bioclip_jax.inference import ImageEmbedder, TextEmbedder, report_skipped
from bioclip_jax.models.clip import CLIP
from bioclip_jax.models.params import assign_params
from bioclip_jax.pretrained import create_model
from bioclip_jax.taxonomy import RANKS, check_text_type

TASKS = ("zero_shot", "few_shot", "linear_probe")
HELD_OUT_NAME = "held_out"  # the name a training run's held-out species go by in its results
CONFIG_JSON = "config.json"  # a training run's config (train/run_identity.py writes it)
DEFAULT_TEXT_TYPE = "taxon_com"  # how the paper scores BioCLIP
RESULTS_JSON = "results.json"
WORKDIR_RESULTS = "eval"  # WORKDIR/eval/<step>/results.json


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
    config.workers = 8
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


def parse_text_types(text_type: str) -> list[str]:
    """"taxon_com,com" -> ["taxon_com", "com"] (each one checked)."""
    types = [t.strip() for t in str(text_type).split(",") if t.strip()]
    if not types:
        raise ValueError(f"no text type in {text_type!r}")
    for text_type_ in types:
        check_text_type(text_type_)
    return types


def fill_defaults(config) -> None:
    """The text types a config leaves open: the training run's (config.json eval.text_type), else taxon_com."""
    if not config.text_type:
        recorded = _recorded_eval(config.workdir).get("text_type") if config.workdir else None
        config.text_type = recorded or DEFAULT_TEXT_TYPE


def check_config(config) -> None:
    fill_defaults(config)
    parse_tasks(config.tasks)
    parse_text_types(config.text_type)
    get_templates(config.templates)
    if config.plot_embeddings and config.plot_embeddings not in RANKS:
        raise ValueError(f"--plot_embeddings must be a rank ({', '.join(RANKS)}), got {config.plot_embeddings!r}")
    if config.trials < 1 or any(int(k) < 1 for k in config.shots):
        raise ValueError(f"trials and shots must be >= 1, got trials={config.trials}, shots={tuple(config.shots)}")


@dataclasses.dataclass
class Embedded:
    data: EvalData
    features: np.ndarray
    labels: np.ndarray


def embed_dataset(model: CLIP, data: EvalData, config, mesh=None) -> Embedded:
    """Image features of a whole dataset; with `mesh`, spread over the processes of that mesh."""
    embedder = ImageEmbedder(model, batch_size=config.batch_size, workers=config.workers, progress=config.progress,
                             mesh=mesh)
    out = embedder.embed_all(data.items(), total=len(data), desc=data.name)
    report_skipped(out.skipped)
    if not len(out.features):
        raise ValueError(f"{data.name}: no readable image")
    return Embedded(data, out.features, np.asarray(out.labels, np.int64))


def _rank_records(dataset: str, prefix: str, codes, predicted_by_trial, true_by_trial,
                  text_type: str = "") -> list[results.Record]:
    """Accuracy at genus .. kingdom and the mean mistake distance, averaged over trials."""
    per_trial = [per_rank.per_rank_accuracy(codes, p, t) for p, t in zip(predicted_by_trial, true_by_trial)]
    records = [results.summarise(dataset, f"{prefix}_{rank}", [a[rank] for a in per_trial], text_type=text_type)
               for rank in reversed(RANKS[:-1])]
    distances = [per_rank.mistake_distance(codes, p, t) for p, t in zip(predicted_by_trial, true_by_trial)]
    records.append(results.summarise(dataset, prefix.replace("_top1", "_mistake_distance"), distances, scale=1.0,
                                     text_type=text_type))
    return records


def score(model: CLIP, embedded: Embedded, config, mesh=None) -> list[results.Record]:
    """All requested metrics from one dataset's stored embeddings."""
    data, features, labels = embedded.data, embedded.features, embedded.labels
    tasks = parse_tasks(config.tasks)
    codes = per_rank.lineage_codes([c.taxon for c in data.classes]) if data.has_taxonomy else None
    records: list[results.Record] = []
    if "zero_shot" in tasks:
        classifier = TextEmbedder(model, batch_size=config.text_batch_size, progress=config.progress, mesh=mesh)
        for text_type in parse_text_types(config.text_type):
            texts = zero_shot.class_texts(data.classes, text_type)
            class_features = classifier.classes(texts, get_templates(config.templates),
                                                desc=f"{data.name} classes ({text_type})")
            top = zero_shot.top_k_classes(features, class_features, k=5)
            accuracy = zero_shot.top_k_accuracy(top, labels, ks=(1, 5))
            records += [results.summarise(data.name, f"zero_shot_top{k}", [accuracy[k]], text_type=text_type)
                        for k in (1, 5)]
            if codes is not None:
                records += _rank_records(data.name, "zero_shot_top1", codes, [top[:, 0]], [labels], text_type)
    for method, name in (("few_shot", ""), ("linear_probe", "_linear")):
        if method not in tasks:
            continue
        for k in config.shots:
            try:
                trials = few_shot.few_shot_trials(features, labels, int(k), config.trials,
                                                  "centroid" if method == "few_shot" else "linear")
            except ValueError as error:  # too few images per class for this k: the other metrics stand
                print(f"{data.name}: {k}-shot skipped: {error}", file=sys.stderr)
                continue
            prefix = f"{k}_shot{name}_top1"
            records.append(results.summarise(data.name, prefix, [t.accuracy for t in trials]))
            if codes is not None and method == "few_shot":
                records += _rank_records(data.name, prefix, codes, [t.predictions for t in trials],
                                         [labels[t.query] for t in trials])
    return records


def _plot_embeddings(embedded: Embedded, rank: str, path: str) -> None:
    data = embedded.data
    if not data.has_taxonomy:
        print(f"{data.name}: no taxonomy for --plot_embeddings={rank}; colouring by class", file=sys.stderr)
        groups = [data.classes[i].name for i in embedded.labels]
    else:
        def name(taxon):
            return taxon.scientific_name if rank == "species" else taxon.lineage(rank)[-1]

        groups = [name(data.classes[i].taxon) for i in embedded.labels]
    with paths.local_stand_in(path) as local:
        plots.embedding_plot(embedded.features, groups, local, f"{data.name}: image embeddings by {rank} (PCA)")
    print(f"wrote {path}")


def _output_paths(out: str) -> tuple[str, str, str]:
    stem = out[:-5] if out.endswith(".json") else out
    return out, stem + ".md", stem + ".png"


GENERIC_FOLDER_NAMES = ("images", "imgs")  # such a folder is named after its parent (held_out/images -> held_out)


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


def _taxa_file(data: EvalData, spec: dict) -> str | None:
    """The taxa.csv that gave the classes their taxonomy (given, or found beside the data)."""
    if not data.has_taxonomy:
        return None
    if spec.get("taxa"):
        return _absolute(spec["taxa"])
    root = getattr(data, "root", None) or os.path.dirname((getattr(data, "paths", None) or [""])[0])
    for folder in (shard_index.as_path(root), shard_index.as_path(root).parent) if root else ():
        if (folder / TAXA_FILE).is_file():
            return _absolute(os.fspath(folder / TAXA_FILE))
    return None


def describe_dataset(data: EvalData, spec: dict | None = None) -> dict:
    """Name, source and size of a dataset as results.json records it."""
    spec = spec or {}
    path = getattr(data, "root", None) or (getattr(data, "paths", None) or [None])[0]
    return {"name": data.name, "source": spec.get("data"), "path": _absolute(path), "taxa": _taxa_file(data, spec),
            "classes": len(data.classes), "images": len(data)}


def _absolute(path) -> str | None:
    if path is None:
        return None
    text = str(path)
    return text if "://" in text else os.path.abspath(text)


def results_about(config, datasets: list[dict], source: str | None, step: int | None = None,
                  architecture: str | None = None) -> dict:
    """What a results file is of: model source and step, class-name types, templates, datasets."""
    tasks = parse_tasks(config.tasks)
    return {"model": {"source": source, "step": step, "architecture": architecture or config.model or None},
            "text_types": parse_text_types(config.text_type) if "zero_shot" in tasks else [],
            "templates": config.templates if "zero_shot" in tasks else None,
            "shots": [int(k) for k in config.shots] if set(tasks) - {"zero_shot"} else [],
            "trials": config.trials if set(tasks) - {"zero_shot"} else None,
            "datasets": datasets}


def write_results(records: list[results.Record], out: str, about: dict | None = None, plot: bool = True,
                  echo: bool = True) -> list[str]:
    """OUT (results.json), OUT's .md table and .png chart, local or gs://; returns the paths written.

    Earlier results at OUT are replaced, and stderr says so; an earlier chart that this run does not
    redraw is removed with them, so the three files always describe the same evaluation."""
    json_path, md_path, png_path = _output_paths(out)
    earlier = [p for p in (json_path, md_path, png_path) if epath.Path(p).exists()]
    with paths.local_stand_in(json_path) as local:
        results.write_json(records, local, about)
    table = results.markdown_table(records, about)
    paths.write_atomically(md_path, table)
    if echo:
        print(table)
    with paths.local_stand_in(png_path) as local:
        charted = plot and plots.comparison_chart(records, local, classes=results.class_counts(about))
    if not charted and png_path in earlier:
        epath.Path(png_path).unlink()
    if earlier:
        names = ", ".join(os.path.basename(p) for p in earlier)
        print(f"replaced the earlier {names} in {os.path.dirname(json_path) or '.'}", file=sys.stderr)
    return [json_path, md_path] + ([png_path] if charted else [])


def workdir_results_path(workdir, step: int | None) -> str:
    """Where a training run's evaluation at `step` goes: WORKDIR/eval/<step>/results.json."""
    folder = epath.Path(workdir) / WORKDIR_RESULTS
    return os.fspath((folder / str(step) if step is not None else folder) / RESULTS_JSON)


def evaluate(model: CLIP, config, out: str | None = None, *, source: str | None = None,
             step: int | None = None) -> list[results.Record]:
    """Every dataset of the config; writes results.json, a markdown table and the bar chart (local or gs://)."""
    check_config(config)
    records: list[results.Record] = []
    described: list[dict] = []
    json_path = out or config.out or RESULTS_JSON
    for spec in dataset_specs(config):
        try:
            data = open_dataset(spec, config)
        except Exception as error:  # noqa: BLE001 - a missing dataset must not stop the suite
            print(f"skipped dataset {spec.get('name') or spec['data']}: {error}", file=sys.stderr)
            continue
        try:
            embedded = embed_dataset(model, data, config)
            found = score(model, embedded, config)
        except ValueError as error:
            print(f"skipped dataset {data.name}: {error}", file=sys.stderr)
            continue
        records += found
        described.append(describe_dataset(data, spec))
        if config.plot_embeddings:
            stem = json_path[:-5] if json_path.endswith(".json") else json_path
            rank = config.plot_embeddings
            _plot_embeddings(embedded, rank, f"{stem}_{_safe(data.name)}_{rank}.png")
    source = source if source is not None else (config.workdir or config.pretrained or None)
    written = write_results(records, json_path, results_about(config, described, source, step), config.plot)
    print(f"wrote {', '.join(written)}")
    return records


def _recorded_eval(workdir) -> dict:
    """The eval fields of a training run's config.json ({} when it has none)."""
    config_path = epath.Path(workdir) / CONFIG_JSON
    return json.loads(config_path.read_text()).get("eval", {}) if config_path.is_file() else {}


def recorded_held_out(workdir) -> dict:
    """The held-out set a training run scored itself on (its config.json's eval fields) as a dataset spec."""
    if not (epath.Path(workdir) / CONFIG_JSON).is_file():
        raise FileNotFoundError(f"{workdir} has no {CONFIG_JSON}: pass --data=folder:PATH")
    recorded = _recorded_eval(workdir)
    folder = recorded.get("held_out_dir")
    if not folder:
        raise ValueError(f"the run in {workdir} recorded no held-out set (eval.held_out_dir): pass --data=...")
    if not shard_index.as_path(folder).is_dir():
        raise FileNotFoundError(f"the held-out folder recorded by {workdir}/{CONFIG_JSON} is gone: {folder}; "
                                f"pass --data=folder:PATH")
    return {"name": HELD_OUT_NAME, "data": f"folder:{folder}", "taxa": recorded.get("taxa_file") or "",
            "label_key": ""}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# ---- evaluating a training run -----------------------------------------------------------------


def finished_steps(workdir) -> list[int]:
    """Steps whose checkpoint is complete (see model_dir.finished_steps)."""
    return model_dir.finished_steps(workdir)


def log_step(workdir, step: int, records: list[results.Record], writer=None) -> None:
    """Adds one line to WORKDIR/metrics.jsonl and the scalars to TensorBoard."""
    line = {"step": step, "time": time.time()}
    line.update({_log_key(r): round(r.mean, 4) for r in records})
    paths.append_line(epath.Path(workdir) / model_dir.METRICS_FILE, json.dumps(line))
    if writer is not None:
        for r in records:
            writer.add_scalar(_log_key(r), r.mean, step)
        writer.flush()


def _log_key(record: results.Record) -> str:
    """eval/DATASET[/TEXT_TYPE]/METRIC: zero-shot keys name their text type."""
    middle = f"{record.text_type}/" if record.text_type else ""
    return f"eval/{record.dataset}/{middle}{record.metric}"


def _tensorboard(workdir):
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional
    except ImportError:
        print("tensorboardX is not installed; logging to metrics.jsonl only", file=sys.stderr)
        return None
    return SummaryWriter(str(epath.Path(workdir) / "tensorboard"), filename_suffix=".eval")


def watch(workdir, config, *, sleep: Callable[[float], None] = time.sleep) -> dict[int, list[results.Record]]:
    """Evaluates each finished checkpoint once, in step order, until none appears for watch_timeout s."""
    check_config(config)
    if not model_dir.is_model_dir(workdir):
        raise FileNotFoundError(f"{workdir} is not a training workdir (no {model_dir.MODEL_JSON})")
    done = {s for s in finished_steps(workdir) if epath.Path(workdir_results_path(workdir, s)).is_file()}
    model = None
    writer = _tensorboard(workdir)
    evaluated: dict[int, list[results.Record]] = {}
    last_new = time.monotonic()
    try:
        while True:
            new = [s for s in finished_steps(workdir) if s not in done]
            for step in new:
                try:
                    if model is None:
                        model = create_model(None, pretrained=workdir, step=step)
                    else:
                        assign_params(model, model_dir.load_params(workdir, step), source=f"{workdir} step {step}")
                except (OSError, ValueError, FileNotFoundError) as error:
                    print(f"step {step}: checkpoint unreadable ({error}); skipped", file=sys.stderr)
                    done.add(step)
                    continue
                print(f"evaluating step {step}", file=sys.stderr)
                records = evaluate(model, config, out=workdir_results_path(workdir, step),
                                   source=str(workdir), step=step)
                log_step(workdir, step, records, writer)
                evaluated[step] = records
                done.add(step)
            if new:
                last_new = time.monotonic()
            elif time.monotonic() - last_new > config.watch_timeout:
                return evaluated
            else:
                sleep(config.poll_seconds)
    finally:
        if writer is not None:
            writer.close()
