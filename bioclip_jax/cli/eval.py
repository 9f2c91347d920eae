"""`python -m bioclip_jax.evaluate` / `bioclip-jax eval`: flags and config files -> evaluate.runner.

    python -m bioclip_jax.evaluate --pretrained=local-dir:bioclip --data=folder:rare_species \\
        --tasks=zero_shot,few_shot --text-type=taxon_com --shots=1,5 --trials=5 --output=results.json
    python -m bioclip_jax.evaluate --config=configs/eval/bioclip_suite.py:/data/eval --pretrained=...
    python -m bioclip_jax.evaluate --workdir=runs/tiny --watch --data=folder:synthetic/held_out/images
    python -m bioclip_jax.evaluate --workdir=runs/tiny   # no --data: the held-out set the run recorded

With --workdir the results go to WORKDIR/eval/<step>/results.{json,md,png} (the folder --watch
writes too; never over the training job's own WORKDIR/results.*), and zero-shot uses the text
types the run lists (config.json eval.text_type) unless --text-type is given. Without --workdir
they go to ./results.json unless --output says where. Earlier results at that place are replaced,
and the command says so.

A config file defines `get_config(arg=None)` returning a ConfigDict whose fields are
those of `evaluate.config.default_config()`; flags given on the command line win over the file,
and `--config.FIELD=VALUE` changes any field. --pretrained, --workdir and --output may be
gs:// paths.
"""

from __future__ import annotations

import sys

import ml_collections

from bioclip_jax import exit_codes
from bioclip_jax.checkpoint import model_dir
from bioclip_jax.cli.common import ArgumentParser, model_source, reading_inputs, run_cli
from bioclip_jax.config_fields import OVERRIDE_PREFIX, apply_overrides, override, read_config_file, set_field
from bioclip_jax.evaluate import runner
from bioclip_jax.evaluate.config import TASKS, check_config, default_config
from bioclip_jax.evaluate.datasets import dataset_specs, recorded_held_out
from bioclip_jax.evaluate.results_files import workdir_results_path
from bioclip_jax.evaluate.watch import watch
from bioclip_jax.pretrained import create_model
from bioclip_jax.sources import SOURCES_HELP

# config field -> argparse keyword arguments of its flag (_flag)
_FLAGS = {
    "pretrained": dict(help=SOURCES_HELP),
    "model": dict(help="architecture name for sources without one (e.g. ViT-B-16)"),
    "workdir": dict(help="training workdir: evaluate its latest checkpoint (or each new one with --watch); "
                         "without --data, on the held-out set the run recorded (config.json eval.held_out_dir)"),
    "watch": dict(action="store_true", default=None, help="evaluate every new checkpoint of --workdir as it appears"),
    "poll_seconds": dict(type=float, help="how often --watch looks for checkpoints (default 60)"),
    "watch_timeout": dict(type=float, help="--watch stops after this many seconds without a new checkpoint"),
    "data": dict(help="folder:PATH | tfds:NAME[:SPLIT] | shards:PATTERN"),
    "name": dict(help="dataset name in the results (default: from --data)"),
    "taxa": dict(help="taxa.csv giving classes a taxonomy (kingdom..species, common[, class_name])"),
    "label_key": dict(help="label member of shards (default scientific_name.txt)"),
    "tasks": dict(help=f"comma list of {', '.join(TASKS)} (default zero_shot,few_shot)"),
    "text_type": dict(help="class names for zero-shot: com, sci, sci_com, taxon, taxon_com, ...; a comma "
                           "list scores each (default: with --workdir the run's eval.text_type, else taxon_com)"),
    "templates": dict(help="prompt templates: openai (80, default) or single"),
    "shots": dict(help="comma list of k for few-shot (default 1,5)"),
    "trials": dict(type=int, help="few-shot trials, seeds 0..T-1 (default 5)"),
    "batch_size": dict(type=int, help="images per device batch (default 64)"),
    "text_batch_size": dict(type=int, help="prompts per text batch (default 256)"),
    "workers": dict(type=int, help="image decoding threads (default 8)"),
    "out": dict(help="results JSON path; the .md table and .png chart go beside it (default: "
                     "WORKDIR/eval/<step>/results.json with --workdir, else results.json); earlier ones are replaced"),
    "plot_embeddings": dict(help="also save a 2-D PCA of image embeddings coloured by this rank"),
    "tfds_data_dir": dict(help="TFDS data directory"),
}


def _flag(field: str) -> str:
    """The command-line flag of a config field: --output for `out`, else the field in kebab-case."""
    return "--" + {"out": "output"}.get(field, field).replace("_", "-")


def build_parser(prog: str = "bioclip-jax eval") -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Zero-shot, few-shot and per-rank evaluation "
                            "of a CLIP model on labelled image sets.", renamed={"--out": "--output"})
    parser.add_argument("--config", help="config file: PATH.py or PATH.py:ARG (get_config(ARG))")
    for field, kwargs in _FLAGS.items():
        parser.add_argument(_flag(field), dest=field, **kwargs)
    parser.add_argument("--no-plot", dest="plot", action="store_false", default=None, help="skip the bar chart")
    parser.add_argument("--tfds-download", dest="tfds_download", action="store_true", default=None,
                        help="let TFDS download and prepare missing datasets")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="hide progress bars")
    return parser


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """default_config() updated by PATH.py's get_config(ARG)."""
    path, loaded = read_config_file(spec, "_bioclip_eval_config")
    return override(default_config(), dict(loaded), where=path)


def build_config(argv: list[str] | None) -> ml_collections.ConfigDict:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    config = load_config_file(args.config) if args.config else default_config()
    for flag in [*_FLAGS, "plot", "tfds_download", "progress"]:
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "shots":
            value = tuple(int(k) for k in str(value).split(",") if k.strip())
        set_field(config, flag, value, _flag(flag))
    for item in rest:
        if not item.startswith(OVERRIDE_PREFIX) or "=" not in item:
            parser.error(f"unrecognised argument {item!r}")
    return apply_overrides(config, rest)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_run, argv, "eval")


def _run(argv: list[str] | None) -> int:
    with reading_inputs():
        config = build_config(argv)
        check_config(config)
        if config.workdir and not config.data and not config.datasets:
            config.datasets = [recorded_held_out(config.workdir)]
        dataset_specs(config)
        architecture, source = model_source(config.workdir or config.pretrained or None, config.model or None)
    if config.workdir and config.watch:
        watch(config.workdir, config)
        return exit_codes.FINISHED
    model = create_model(architecture, source)
    if config.workdir:
        steps = model_dir.finished_steps(config.workdir)
        step = steps[-1] if steps else None
        records = runner.evaluate(model, config, config.out or workdir_results_path(config.workdir, step),
                                  source=config.workdir, step=step)
    else:
        records = runner.evaluate(model, config, source=source)
    if not records:
        print("eval: no dataset could be evaluated", file=sys.stderr)
        return exit_codes.ERROR
    return exit_codes.FINISHED
