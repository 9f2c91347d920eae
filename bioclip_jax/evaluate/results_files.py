"""Where results go and how they are written: results.json, its .md table and .png chart together.

`results_about` is what the numbers are of (model source and step, text types, templates,
datasets); a training run's evaluation at a step goes to WORKDIR/eval/<step>/results.json.
"""

from __future__ import annotations

import logging
import os

from etils import epath

from bioclip_jax import paths
from bioclip_jax.evaluate import plots, results
from bioclip_jax.evaluate.config import parse_tasks, parse_text_types

log = logging.getLogger(__name__)

RESULTS_JSON = "results.json"
WORKDIR_RESULTS = "eval"  # WORKDIR/eval/<step>/results.json


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


def output_stem(out: str) -> str:
    """OUT without its .json: the .md, .png and embedding plots are named after it."""
    return out[:-5] if out.endswith(".json") else out


def write_results(records: list[results.Record], out: str, about: dict | None = None, plot: bool = True,
                  echo: bool = True) -> list[str]:
    """OUT (results.json), OUT's .md table and .png chart, local or gs://; returns the paths written.

    Earlier results at OUT are replaced, and stderr says so; an earlier chart that this run does not
    redraw is removed with them, so the three files always describe the same evaluation."""
    stem = output_stem(out)
    json_path, md_path, png_path = out, stem + ".md", stem + ".png"
    earlier = [p for p in (json_path, md_path, png_path) if epath.Path(p).exists()]
    with paths.local_stand_in(json_path) as local:
        results.write_json(records, local, about)
    table = results.markdown_table(records, about)
    paths.write_atomically(md_path, table)
    if echo:
        log.info(table)
    with paths.local_stand_in(png_path) as local:
        charted = plot and plots.comparison_chart(records, local, classes=results.class_counts(about))
    if not charted and png_path in earlier:
        epath.Path(png_path).unlink()
    if earlier:
        names = ", ".join(os.path.basename(p) for p in earlier)
        log.warning(f"replaced the earlier {names} in {os.path.dirname(json_path) or '.'}")
    return [json_path, md_path] + ([png_path] if charted else [])


def workdir_results_path(workdir, step: int | None) -> str:
    """Where a training run's evaluation at `step` goes: WORKDIR/eval/<step>/results.json."""
    folder = epath.Path(workdir) / WORKDIR_RESULTS
    return os.fspath((folder / str(step) if step is not None else folder) / RESULTS_JSON)
