"""Resumable outputs of archive runs: whatever a crash leaves, a rerun ends with each image's rows exactly once."""

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bioclip_jax.outputs import EmbeddingShards, RowsOutput, merge_embedding_parts, merge_parts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDENTITY = {"model": "hf-hub:imageomics/bioclip-2", "labels": "3f2a", "rank": "species", "k": 2}


def rows_for(key: str, k: int = 2) -> list[dict]:
    """k prediction rows of one image, its values a function of the image (so a row can be checked)."""
    return [{"file_name": key, "species": f"{key}-guess-{r}", "score": f"{(len(key) * 7 + r) % 97 / 97:.6f}"}
            for r in range(k)]


def read_rows(path) -> list[dict]:
    path = str(path)
    if path.endswith(".csv"):
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in open(path)]


def read_skipped(path) -> list[str]:
    return [row["file_name"] for row in read_rows(path)] if os.path.exists(path) else []


def assert_each_image_once(rows: list[dict], keys: list[str], k: int = 2) -> None:
    expected = [row for key in keys for row in rows_for(key, k)]
    key_order = sorted(rows, key=lambda row: (row["file_name"], row["species"]))
    assert key_order == sorted(expected, key=lambda row: (row["file_name"], row["species"]))


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_rows_written_then_reopened_give_done(tmp_path, fmt):
    path = tmp_path / f"preds.{fmt}"
    output = RowsOutput(str(path), IDENTITY, rows_per_key=2)
    assert output.done == set()
    output.write(rows_for("a.jpg") + rows_for("b.jpg"))
    output.skip("broken.jpg", "cannot identify image file")
    output.close()
    assert output.summary.answered == 2 and output.summary.skipped == 1

    again = RowsOutput(str(path), IDENTITY, rows_per_key=2)
    assert again.done == {"a.jpg", "b.jpg", "broken.jpg"}
    assert again.pending(["a.jpg", "broken.jpg", "c.jpg"]) == ["c.jpg"]
    again.write(rows_for("c.jpg"))
    again.close()
    assert again.summary.already_done == 3 and again.summary.answered == 1
    assert_each_image_once(read_rows(path), ["a.jpg", "b.jpg", "c.jpg"])
    assert read_skipped(tmp_path / "preds.skipped.csv") == ["broken.jpg"]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_file_cut_at_any_byte_resumes_without_a_duplicate_or_a_lost_row(tmp_path, fmt):
    """Cut in a line, between an image's k rows, or between images: the rerun answers exactly what is missing."""
    keys = [f"img{i}.jpg" for i in range(5)] + ['odd, "quoted"\nname.jpg']
    whole = tmp_path / f"whole.{fmt}"
    output = RowsOutput(str(whole), IDENTITY, rows_per_key=2)
    for key in keys:
        output.write(rows_for(key))
    output.close()
    content = whole.read_bytes()
    line_ends = [i + 1 for i, byte in enumerate(content) if byte == ord("\n")]
    cuts = sorted({cut for end in line_ends for cut in (end - 1, end, end + 1)} | set(range(0, len(content), 5)))
    for cut in cuts:
        run = tmp_path / f"cut{cut}"
        run.mkdir()
        path = run / f"preds.{fmt}"
        path.write_bytes(content[:cut])
        shutil.copy(f"{whole}.run.json", f"{path}.run.json")
        resumed = RowsOutput(str(path), IDENTITY, rows_per_key=2)
        resumed.write([row for key in resumed.pending(keys) for row in rows_for(key)])
        resumed.close()
        assert_each_image_once(read_rows(path), keys)
        shutil.rmtree(run)


def test_an_identity_change_is_refused_in_one_sentence(tmp_path):
    path = tmp_path / "preds.csv"
    output = RowsOutput(str(path), IDENTITY, rows_per_key=2)
    output.write(rows_for("a.jpg"))
    output.close()
    with pytest.raises(ValueError) as refused:
        RowsOutput(str(path), {**IDENTITY, "rank": "genus"}, rows_per_key=2)
    message = str(refused.value)
    assert str(path) in message and 'rank was "species" and is now "genus"' in message
    assert "another --output" in message and message.count(". ") == 0
    assert read_rows(path) == rows_for("a.jpg")  # untouched

    (tmp_path / "old.csv").write_text("file_name,score\nx.jpg,1\n")
    with pytest.raises(ValueError, match="no resumable run wrote it"):
        RowsOutput(str(tmp_path / "old.csv"), IDENTITY)
    with pytest.raises(ValueError, match="in a bucket"):
        RowsOutput("gs://bucket/preds.csv", IDENTITY)
    with pytest.raises(ValueError, match="has 1 rows, but .* takes 2 per image"):
        RowsOutput(str(tmp_path / "new.csv"), IDENTITY, rows_per_key=2).write(rows_for("a.jpg", k=1))


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "parquet"])
def test_formats_round_trip(tmp_path, suffix):
    path = tmp_path / f"preds.{suffix}"
    rows = [{"file_name": "ü/ä.jpg", "species": "Corvus corax", "score": 0.25},
            {"file_name": "b.jpg", "species": 'a "quoted", name', "score": 0.5}]
    output = RowsOutput(str(path), IDENTITY)
    output.write(rows[:1])
    output.close()
    output = RowsOutput(str(path), IDENTITY)  # a second run appends
    assert output.done == {"ü/ä.jpg"}
    output.write(rows[1:])
    output.close()
    expected = [{**row, "score": str(row["score"])} for row in rows] if suffix == "csv" else rows
    assert read_rows(path) == expected
    assert not os.path.exists(f"{path}.parts")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_parts_of_three_processes_merge_into_what_one_process_writes(tmp_path, fmt):
    keys = [f"img{i:02d}.jpg" for i in range(20)]
    alone = RowsOutput(str(tmp_path / f"alone.{fmt}"), IDENTITY, rows_per_key=2)
    for key in keys[:8]:  # an earlier single-process run did a few
        alone.write(rows_for(key))
    alone.close()
    shutil.copy(tmp_path / f"alone.{fmt}", tmp_path / f"split.{fmt}")
    shutil.copy(tmp_path / f"alone.{fmt}.run.json", tmp_path / f"split.{fmt}.run.json")
    alone = RowsOutput(str(tmp_path / f"alone.{fmt}"), IDENTITY, rows_per_key=2)
    alone.write([row for key in alone.pending(keys) for row in rows_for(key)])
    alone.close()

    outputs = [RowsOutput(str(tmp_path / f"split.{fmt}"), IDENTITY, rows_per_key=2, process_index=i,
                          process_count=3) for i in range(3)]
    for output in outputs:
        assert output.done == set(keys[:8])
        output.write([row for key in output.pending(keys) for row in rows_for(key)])
        output.close()
    parts = tmp_path / f"split.{fmt}.parts"
    staged = tmp_path / "staged"
    shutil.copytree(parts, staged)
    merge_parts(str(tmp_path / f"split.{fmt}"))
    assert not parts.exists()
    shutil.copytree(staged, parts)  # a merge cut short after the rename: merged again, no row twice
    merge_parts(str(tmp_path / f"split.{fmt}"))
    split, alone_rows = read_rows(tmp_path / f"split.{fmt}"), read_rows(tmp_path / f"alone.{fmt}")
    assert len(split) == 40
    assert sorted(map(json.dumps, split)) == sorted(map(json.dumps, alone_rows))


def test_skipped_keys_count_as_done_across_processes(tmp_path):
    path = str(tmp_path / "preds.jsonl")
    first = RowsOutput(path, IDENTITY, process_index=1, process_count=2)
    first.skip("bad.jpg", "truncated file")
    first.close()
    second = RowsOutput(path, IDENTITY, process_index=0, process_count=2)
    assert second.done == {"bad.jpg"}
    second.close()
    merge_parts(path)
    assert RowsOutput(path, IDENTITY).done == {"bad.jpg"}
    assert read_skipped(tmp_path / "preds.skipped.csv") == ["bad.jpg"]


ROWS_WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from test_outputs import IDENTITY, rows_for
    from bioclip_jax.outputs import RowsOutput
    output = RowsOutput(sys.argv[1], IDENTITY, rows_per_key=2)
    todo = output.pending([f"img{i:04d}.jpg" for i in range(1500)])
    print("batches", -(-len(todo) // 6), flush=True)
    for start in range(0, len(todo), 6):
        batch = todo[start:start + 6]
        for key in batch:
            if key.endswith("3.jpg"):
                output.skip(key, "unreadable")
        output.write([row for key in batch if not key.endswith("3.jpg") for row in rows_for(key)])
        print("wrote", start // 6 + 1, flush=True)
        time.sleep(0.001)
    output.close()
""")

EMBEDDINGS_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from bioclip_jax.outputs import EmbeddingShards
    shards = EmbeddingShards(sys.argv[1], 8, {"model": "m"}, rows_per_shard=5, seconds_per_shard=0.02)
    todo = [key for key in (f"img{i:04d}.jpg" for i in range(800)) if key not in shards.done]
    print("batches", -(-len(todo) // 3), flush=True)
    for start in range(0, len(todo), 3):
        keys = todo[start:start + 3]
        for key in keys:
            if key.endswith("7.jpg"):
                shards.skip(key, "unreadable")
        keys = [key for key in keys if not key.endswith("7.jpg")]
        features = np.stack([np.random.default_rng(int(key[3:7])).standard_normal(8) for key in keys] or
                            [np.zeros(8)])[:len(keys)]
        shards.write(keys, features)
        print("wrote", start // 3 + 1, flush=True)
        time.sleep(0.002)
    shards.close()
""")


def run_killed_then_whole(script: str, output: str, kills: int, seed: int) -> None:
    """Runs `script` and SIGKILLs it `kills` times at a random moment while it writes; then lets it finish.

    The kill waits for the writer to report a random number of batches, at most half of what it has left,
    then a random 0-3 ms more, so it lands anywhere inside a write but always before the writer's end
    (it sleeps >= 1 ms a batch and has >= 8 batches left): every one of the `kills` runs is cut short."""
    chance = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": REPO}
    for attempt in range(kills + 1):
        process = subprocess.Popen([sys.executable, "-c", script, output, os.path.dirname(__file__)],
                                   stdout=subprocess.PIPE, env=env, cwd=REPO)
        label, batches = process.stdout.readline().split()
        assert label == b"batches"
        if attempt < kills:
            assert int(batches) >= 16, "too few batches left to kill the writer mid-run"
            target = chance.randint(1, int(batches) // 2)
            for line in iter(process.stdout.readline, b""):
                if line.split() == [b"wrote", str(target).encode()]:
                    break
            time.sleep(chance.uniform(0, 0.003))
            assert process.poll() is None, "the writer ended before it was killed"
            os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == (-signal.SIGKILL if attempt < kills else 0)


def test_rows_survive_kill_9_at_random_moments(tmp_path):
    path = str(tmp_path / "preds.csv")
    run_killed_then_whole(ROWS_WRITER, path, kills=4, seed=21)
    keys = [f"img{i:04d}.jpg" for i in range(1500)]
    assert_each_image_once(read_rows(path), [key for key in keys if not key.endswith("3.jpg")])
    assert sorted(read_skipped(tmp_path / "preds.skipped.csv")) == [key for key in keys if key.endswith("3.jpg")]


def expected_vector(key: str) -> np.ndarray:
    return np.random.default_rng(int(key[3:7])).standard_normal(8).astype(np.float32)


def test_embeddings_survive_kill_9_at_random_moments(tmp_path):
    path = str(tmp_path / "features.npy")
    run_killed_then_whole(EMBEDDINGS_WRITER, path, kills=4, seed=22)
    keys = (tmp_path / "features.keys.txt").read_text().splitlines()
    expected = [f"img{i:04d}.jpg" for i in range(800) if i % 10 != 7]
    assert sorted(keys) == expected  # every key once
    features = np.load(path)
    assert features.shape == (len(keys), 8)
    np.testing.assert_array_equal(features, np.stack([expected_vector(key) for key in keys]))
    assert sorted(read_skipped(tmp_path / "features.skipped.csv")) == [
        f"img{i:04d}.jpg" for i in range(800) if i % 10 == 7]
    assert not os.path.exists(path + ".parts")


def test_embedding_shards_of_processes_index_every_key_once(tmp_path):
    folder = tmp_path / "features"
    keys = [f"img{i:04d}.jpg" for i in range(23)]
    first = EmbeddingShards(str(folder), 8, {"model": "m"}, rows_per_shard=4)
    first.write(keys[:6], np.stack([expected_vector(key) for key in keys[:6]]))
    del first  # killed: the 2 rows past the first shard were never written
    shards = [EmbeddingShards(str(folder), 8, {"model": "m"}, rows_per_shard=4, process_index=i, process_count=2)
              for i in range(2)]
    assert shards[1].done == set(keys[:4])
    for process, output in enumerate(shards):
        mine = [key for key in keys[process::2] if key not in output.done]
        output.write(mine, np.stack([expected_vector(key) for key in mine]))
        output.close()
    merge_embedding_parts(str(folder))
    with open(folder / "index.csv", newline="") as handle:
        index = list(csv.DictReader(handle))
    assert sorted(row["key"] for row in index) == keys
    for row in index:
        np.testing.assert_array_equal(np.load(folder / row["shard"])[int(row["row"])], expected_vector(row["key"]))
    with pytest.raises(ValueError, match="dim was 8 and is now 16"):
        EmbeddingShards(str(folder), 16, {"model": "m"})
