"""Results files: the bar chart shows published numbers only where they exist, and the README's API example."""

import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import LineCollection
from matplotlib.container import BarContainer

from bioclip_jax.evaluate import plots, results


@pytest.fixture
def figures(monkeypatch):
    """The figures comparison_chart draws, kept open for inspection."""
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    return drawn


def _bars_by_series(ax) -> dict[str, list[float]]:
    return {container.get_label(): [bar.get_height() for bar in container] for container in ax.containers
            if isinstance(container, BarContainer)}


def test_chart_has_no_published_bars_or_title_for_unpublished_datasets(figures):
    only_ours = [results.summarise("held_out", "zero_shot_top1", [0.4])]
    assert plots.comparison_chart(only_ours, "unused.png")
    assert "published" not in figures.pop()._suptitle.get_text().lower()
    records = [results.summarise("held_out", "zero_shot_top1", [0.4], text_type="taxon_com"),
               results.summarise("held_out", "zero_shot_top1", [0.3], text_type="com"),
               results.summarise("held_out", "1_shot_top1", [0.5, 0.7])]
    assert plots.comparison_chart(records, "unused.png")
    (fig,) = figures
    assert "published" not in fig._suptitle.get_text().lower()
    for ax in fig.axes:
        assert not {"CLIP", "OpenCLIP", "BioCLIP"} & set(_bars_by_series(ax))
    zero, one = fig.axes
    assert _bars_by_series(zero) == {"ours (taxon_com)": [pytest.approx(40.0)], "ours (com)": [pytest.approx(30.0)]}
    assert [t.get_text() for t in zero.texts] == ["40.0", "30.0"]  # each bar labelled with its value
    assert [t.get_text() for t in one.texts] == ["60.0"]


def test_chart_shows_published_bars_only_on_published_datasets(figures):
    records = [results.summarise("rare_species", "zero_shot_top1", [0.4]),
               results.summarise("mine", "zero_shot_top1", [0.2])]
    assert plots.comparison_chart(records, "unused.png")
    (fig,) = figures
    assert "published" in fig._suptitle.get_text()
    bars = _bars_by_series(fig.axes[0])
    assert bars["BioCLIP"] == [pytest.approx(37.8)] and bars["CLIP"] == [pytest.approx(26.6)]  # no bar for "mine"
    assert bars["ours"] == [pytest.approx(40.0), pytest.approx(20.0)]
    assert "37.8" in [t.get_text() for t in fig.axes[0].texts]


HELD_OUT = [results.summarise("held_out", "zero_shot_top1", [0.4], text_type="taxon_com"),
            results.summarise("held_out", "zero_shot_top5", [0.9], text_type="taxon_com"),
            results.summarise("held_out", "zero_shot_top1", [0.3], text_type="com"),
            results.summarise("held_out", "zero_shot_top5", [0.8], text_type="com"),
            results.summarise("held_out", "zero_shot_top1_genus", [0.5], text_type="com"),
            results.summarise("held_out", "zero_shot_mistake_distance", [2.5], scale=1.0, text_type="com"),
            results.summarise("held_out", "1_shot_top1", [0.5, 0.7, 0.6]),
            results.summarise("held_out", "5_shot_top1", [0.8, 0.9, 0.7])]


def _about(classes: int) -> dict:
    return {"model": {"source": "runs/x", "step": 30, "architecture": "ViT-Tiny-8"},
            "text_types": ["taxon_com", "com"], "templates": "openai",
            "datasets": [{"name": "held_out", "path": "/d/images", "taxa": None, "classes": classes, "images": 99}]}


def test_markdown_has_a_title_and_says_how_to_read_it():
    table = results.markdown_table(HELD_OUT, _about(20))
    assert table.startswith("# Evaluation of runs/x, step 30 on held_out\n")
    assert "top-1 chance (a class picked at random) is 5.00% on held_out (20 classes)" in table
    assert "a ± b: mean and standard deviation over 3 few-shot trials" in table
    assert "text type taxon_com: zero-shot classes named by taxonomic name with common name" in table
    assert "text type com: zero-shot classes named by common name" in table
    assert "mistake distance: over the wrong predictions, the mean number of ranks" in table
    # 20 classes: no top-5 column (results.json keeps it); 21: shown
    assert "| dataset | text type | zero_shot_top1 | 1_shot_top1 | 5_shot_top1 |" in table
    assert "zero_shot_top5" not in table and "top-5 is left out" in table
    wide = results.markdown_table(HELD_OUT, _about(21))
    assert "| dataset | text type | zero_shot_top1 | zero_shot_top5 | 1_shot_top1 | 5_shot_top1 |" in wide
    assert "| held_out | com | 30.00 | 80.00 | 60.00 ± 8.16 | 80.00 ± 8.16 |" in wide
    assert "top-5 is left out" not in wide
    assert "zero_shot_top5" in results.markdown_table(HELD_OUT)  # number of classes unknown: kept


def test_chart_draws_chance_error_bars_and_a_legend_clear_of_the_bars(figures):
    assert plots.comparison_chart(HELD_OUT, "unused.png", classes={"held_out": 20})
    (fig,) = figures
    zero, one, five = fig.axes
    for ax in fig.axes:  # each dataset's chance level, dashed across its group of bars
        (chance,) = [c for c in ax.collections if isinstance(c, LineCollection) and c.get_label() == plots.CHANCE_LABEL]
        assert [segment[:, 1].tolist() for segment in chance.get_segments()] == [[5.0, 5.0]]
        assert ax.get_legend() is None  # one legend for the figure instead
    (bars,) = [c for c in one.containers if isinstance(c, BarContainer)]
    assert bars.errorbar is not None  # std over the 3 trials
    (caps,) = bars.errorbar.lines[2]
    assert np.ptp(caps.get_segments()[0][:, 1]) == pytest.approx(2 * HELD_OUT[6].std)
    assert all(c.errorbar is None for c in zero.containers if isinstance(c, BarContainer))  # one trial: none
    assert [t.get_text() for t in one.texts] == ["60.0"]
    assert "error bars: std over 3 trials" in fig._suptitle.get_text()
    (legend,) = fig.legends
    assert {t.get_text() for t in legend.get_texts()} == {"ours (taxon_com)", "ours (com)", "ours",
                                                          plots.CHANCE_LABEL}
    fig.canvas.draw()
    box = legend.get_window_extent()
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent()), "the legend sits on a panel"


def test_results_json_records_what_it_is_of_and_reads_old_files(tmp_path):
    records = [results.summarise("held_out", "zero_shot_top1", [0.5], text_type="com"),
               results.summarise("held_out", "1_shot_top1", [0.5, 0.7])]
    about = {"model": {"source": "runs/x", "step": 30, "architecture": "ViT-Tiny-8"}, "text_types": ["com"],
             "templates": "openai", "datasets": [{"name": "held_out", "path": "/d/held_out/images",
                                                  "taxa": "/d/held_out/taxa.csv", "classes": 4, "images": 9}]}
    path = str(tmp_path / "results.json")
    results.write_json(records, path, about)
    assert results.read_about(path) == about
    assert [r.text_type for r in results.read_json(path)] == ["com", ""]
    table = results.markdown_table(records, about)
    assert "- model: runs/x (ViT-Tiny-8), step 30" in table
    assert "- zero-shot class names: com (templates: openai)" in table
    assert "- dataset held_out: /d/held_out/images, taxa /d/held_out/taxa.csv: 4 classes, 9 images" in table
    assert "| held_out | com | 50.00 | 60.00 ± 10.00 |" in table
    old = '[{"dataset": "d", "metric": "zero_shot_top1", "mean": 1, "std": 0, "trials": 1}]'
    (tmp_path / "old.json").write_text(old)
    assert results.read_json(str(tmp_path / "old.json")) == [results.Record("d", "zero_shot_top1", 1.0, 0.0, 1)]


def test_readme_api_example_gives_probabilities(tmp_path, monkeypatch):
    """The README's API snippet, run on a random tiny model: its `probabilities` are a softmax over labels."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    (code,) = [block for block in re.findall(r"```python\n(.*?)```", readme, re.S) if "probabilities" in block]
    code = re.sub(r'create_model\("ViT-B-16", pretrained="[^"]*"\)', 'create_model("ViT-Tiny-8", seed=1)', code)
    code = code.replace('get_tokenizer("ViT-B-16")', 'get_tokenizer("ViT-Tiny-8")')
    from PIL import Image
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), dtype=np.uint8)).save(tmp_path / "raven.jpg")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # our own README
    probabilities = np.asarray(namespace["probabilities"])
    assert probabilities.shape == (1, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert (probabilities > 0).all()
