"""`bioclip-jax predict` over an archive: resumable after kill -9, the same rows from 2 processes x 4 devices
as from 1 x 1, manifests in a bucket, refusal to mix two runs in one output, and the closing summary."""

import csv
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from gcs_server import gcs_bucket, gcs_dir, gcs_env  # noqa: F401 - fixtures
from multiprocess_runs import LAUNCHER, subprocess_env
from PIL import Image

import bioclip_jax
from bioclip_jax import exit_codes
from bioclip_jax.cli import predict

LABELS = "crow,raven,rook,sparrow,magpie"
IMAGES = 96


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A random tiny model and a camera-trap-like folder tree of IMAGES images plus one broken file."""
    root = tmp_path_factory.mktemp("archive")
    bioclip_jax.export_open_clip(bioclip_jax.create_model("ViT-Tiny-8", seed=5), str(root / "model"))
    rng = np.random.default_rng(2)
    for i in range(IMAGES):
        path = root / "traps" / f"site{i % 3}" / f"night{i % 2}" / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + i % 7 * 9, 64, 3), dtype=np.uint8)).save(path)
    (root / "traps" / "site0" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return {"root": root, "source": f"local-dir:{root / 'model'}", "folder": str(root / "traps")}


def _argv(archive, output, *more) -> list[str]:
    return [archive["folder"], "--pretrained", archive["source"], "--cls", LABELS, "--k", "2", "--batch-size", "8",
            "--workers", "1", "--no-progress", "--output", str(output), *more]


def _command(argv) -> list[str]:
    return [sys.executable, "-m", "bioclip_jax.cli.predict", *argv]


def _rows(path) -> dict[str, dict[str, float]]:
    """file_name -> {label: score}; fails on a repeated row."""
    answers: dict[str, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            labels = answers.setdefault(row["file_name"], {})
            assert row["classification"] not in labels, f"row repeated: {row}"
            labels[row["classification"]] = float(row["score"])
    return answers


def _same_rows(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, labels in expected.items():
        assert got[key].keys() == labels.keys(), key
        np.testing.assert_allclose([got[key][label] for label in labels], list(labels.values()), atol=1e-5)


@pytest.fixture(scope="module")
def uninterrupted(archive):
    output = archive["root"] / "whole.csv"
    result = subprocess.run(_command(_argv(archive, output)), env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return {"rows": _rows(output), "output": output, "stdout": result.stdout, "stderr": result.stderr}


def test_every_image_is_answered_once_and_the_broken_one_is_listed(archive, uninterrupted):
    rows = uninterrupted["rows"]
    assert len(rows) == IMAGES and all(len(labels) == 2 for labels in rows.values())
    with open(str(uninterrupted["output"])[:-4] + ".skipped.csv", newline="") as handle:
        skipped = list(csv.DictReader(handle))
    assert [row["file_name"] for row in skipped] == [os.path.join(archive["folder"], "site0", "broken.jpg")]
    assert skipped[0]["reason"]
    summary = uninterrupted["stderr"] + uninterrupted["stdout"]
    assert f"{IMAGES} images classified, 1 skipped" in summary and "images/s" in summary, summary


def test_kill_9_then_rerun_gives_the_rows_of_an_uninterrupted_run(archive, uninterrupted, tmp_path):
    output = tmp_path / "killed.csv"
    process = subprocess.Popen(_command(_argv(archive, output)), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if output.exists() and output.read_text().count("\n") > IMAGES // 2:  # half the rows (header, k=2 each)
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    written = output.read_text().count("\n")
    assert written < 2 * IMAGES, "killed after the last row: nothing is left to resume"
    result = subprocess.run(_command(_argv(archive, output)), env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    _same_rows(_rows(output), uninterrupted["rows"])
    summary = re.search(r"(\d+) images classified, (\d+) skipped, (\d+) done by an earlier run",
                        result.stdout + result.stderr)
    assert summary, result.stdout + result.stderr
    classified, skipped, earlier = map(int, summary.groups())
    assert 0 < classified < IMAGES and classified + skipped + earlier == IMAGES + 1  # only the rest was done


def test_two_processes_of_four_devices_give_the_rows_of_one(archive, uninterrupted, tmp_path):
    output = tmp_path / "two.csv"
    env = dict(subprocess_env(), PYTHON=sys.executable, LOG_DIR=str(tmp_path / "logs"), KILL_GRACE_SECONDS="3",
               TRAIN_MODULE="bioclip_jax.cli.predict")
    result = subprocess.run(["bash", LAUNCHER, "2", "4", "--", *_argv(archive, output)], env=env,
                            capture_output=True, text=True, timeout=420)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("process-*.log")))
    assert result.returncode == 0, logs
    _same_rows(_rows(output), uninterrupted["rows"])
    assert not (tmp_path / "two.csv.parts").exists() or not os.listdir(tmp_path / "two.csv.parts")
    with open(tmp_path / "two.skipped.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1


def test_another_label_set_refuses_to_append(archive, uninterrupted, tmp_path, capsys):
    output = tmp_path / "mine.csv"
    assert predict.main(_argv(archive, output)[:1] + [os.path.join(archive["folder"], "site1"),
                                                       *_argv(archive, output)[1:]]) == 0
    before = output.read_text()
    argv = _argv(archive, output)
    argv[argv.index(LABELS)] = "crow,raven"
    capsys.readouterr()
    assert predict.main(argv) == exit_codes.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(output) in err[0] and "labels" in err[0], err
    assert output.read_text() == before


def test_a_manifest_in_a_bucket(archive, gcs_dir, tmp_path):
    """A CSV manifest in a bucket whose relative entries are images beside it, in the bucket."""
    from etils import epath

    names = sorted(os.listdir(os.path.join(archive["folder"], "site2", "night0")))[:5]
    for name in names:
        (epath.Path(gcs_dir) / "photos" / name).write_bytes(
            open(os.path.join(archive["folder"], "site2", "night0", name), "rb").read())
    (epath.Path(gcs_dir) / "manifest.csv").write_text("path,site\n" + "".join(f"photos/{n},2\n" for n in names))
    output = tmp_path / "bucket.jsonl"
    argv = [f"{gcs_dir}/manifest.csv", *_argv(archive, output)[1:]]
    assert predict.main(argv) == 0
    keys = {line.split('"file_name": "')[1].split('"')[0] for line in output.read_text().splitlines()}
    assert keys == {f"{gcs_dir}/photos/{n}" for n in names}


def test_random_models_are_told_apart_by_architecture_and_seed(archive):
    """Random weights have no source: before, every random model had the same identity, so a rerun with
    another architecture appended to an output it had not made."""
    from bioclip_jax.archive import model_identity

    def identity(name, seed):
        return model_identity(bioclip_jax.create_model(name, pretrained="random", seed=seed), seed)

    assert identity("ViT-Tiny-8", 0) == identity("ViT-Tiny-8", 0)
    assert identity("ViT-Tiny-8", 0) != identity("ViT-Tiny-8", 1)
    assert identity("ViT-Tiny-8", 0) != identity("ViT-B-32", 0)
    assert model_identity(bioclip_jax.create_model(None, pretrained=archive["source"]), 0) == {
        "model": archive["source"]}
