"""The training pipeline: global order, host split, exact resume, workers, bad samples, skip budget."""

from __future__ import annotations

import io
import os

import grain
import numpy as np
import pytest
from PIL import Image

from bioclip_jax.data import decode, pipeline
from bioclip_jax.data.pipeline import SKIP_REASONS, BadDataError, SkipBudget, make_train_dataset
from bioclip_jax.data.tar_source import TarShardSource
from bioclip_jax.ingest.convert import convert_to_array_record
from bioclip_jax.tokenizer import get_tokenizer
from test_shard_source import tiny_jpeg, write_shards

SEED = 7
N = 24


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOCLIP_JAX_INDEX_CACHE", str(tmp_path / "index_cache"))


@pytest.fixture
def shards(tmp_path):
    write_shards(tmp_path / "shards", N, 8)
    return str(tmp_path / "shards" / "shard-{000000..000002}.tar")


def dataset(shards, **overrides):
    options = dict(global_batch_size=8, seed=SEED, text_type="com", tokenizer="ViT-B-16", image_size=16,
                   worker_count=0)
    options.update(overrides)
    return make_train_dataset(shards, **options)


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def sample_of_tokens(tokens: np.ndarray, count: int = N) -> list[int]:
    """Which sample each token row captions ("com" captions are "a photo of bird {i}.")."""
    rows = get_tokenizer("ViT-B-16")([f"a photo of bird {i}." for i in range(count)])
    lookup = {row.tobytes(): i for i, row in enumerate(rows)}
    return [lookup[row.tobytes()] for row in tokens]


def assert_batches_equal(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_follow_the_seeded_global_shuffle(shards):
    batches = take(iter(dataset(shards)), 6)  # two epochs
    first = batches[0]
    assert first["image"].shape == (8, 16, 16, 3) and first["image"].dtype == np.uint8
    assert first["tokens"].shape == (8, 77) and first["tokens"].dtype == np.int32
    assert first["skipped"].shape == (len(SKIP_REASONS),) and not first["skipped"].any()
    assert first["last_bad_shard"] == -1
    positions = np.concatenate([b["position"] for b in batches])
    np.testing.assert_array_equal(positions, np.arange(48))
    seen = sample_of_tokens(np.concatenate([b["tokens"] for b in batches]))
    order = grain.MapDataset.range(N).shuffle(seed=SEED).repeat()
    assert seen == [order[p] for p in range(48)]
    assert sorted(seen[:N]) == sorted(seen[N:]) == list(range(N))
    assert seen[:N] != seen[N:]  # reshuffled every epoch
    assert len({b["image"].tobytes() for b in batches}) == 6


def test_resume_from_saved_state_is_bitwise_identical(shards):
    iterator = iter(dataset(shards, text_type="random"))
    take(iterator, 2)
    state = iterator.get_state()
    expected = take(iterator, 3)
    fresh = iter(dataset(shards, text_type="random"))
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_two_hosts_together_make_the_one_host_global_batch(shards):
    single = take(iter(dataset(shards, text_type="per_sample")), 3)
    hosts = [take(iter(dataset(shards, text_type="per_sample", process_index=h, process_count=2)), 3)
             for h in range(2)]
    for step, whole in enumerate(single):
        parts = [hosts[h][step] for h in range(2)]
        assert [p["image"].shape[0] for p in parts] == [4, 4]
        np.testing.assert_array_equal(parts[0]["position"] % 2, 0)
        merged_positions = np.concatenate([p["position"] for p in parts])
        order = np.argsort(merged_positions)
        np.testing.assert_array_equal(merged_positions[order], whole["position"])
        for key in ("image", "tokens"):
            merged = np.concatenate([p[key] for p in parts])[order]
            np.testing.assert_array_equal(merged, whole[key], err_msg=key)


def test_finite_epochs_give_every_host_the_same_number_of_batches(tmp_path):
    write_shards(tmp_path, 30, 8)
    counts = [sum(1 for _ in dataset(str(tmp_path), num_epochs=1, process_index=h, process_count=2))
              for h in range(2)]
    assert counts == [3, 3]  # 30 samples hold 3 full global batches of 8


def test_worker_process_gives_the_same_batches(shards):
    expected = take(iter(dataset(shards)), 3)
    iterator = iter(dataset(shards, worker_count=1))
    try:
        assert_batches_equal(take(iterator, 3), expected)
    finally:
        iterator.close()


def test_array_record_copy_gives_the_same_batches(shards, tmp_path):
    convert_to_array_record(TarShardSource(shards), str(tmp_path / "ar"), records_per_file=10)
    from_tar = take(iter(dataset(shards)), 4)
    from_records = take(iter(dataset(str(tmp_path / "ar" / "*.array_record"))), 4)
    assert_batches_equal(from_records, from_tar)


# ----------------------------------------------------------------------------- decode


def smooth_jpeg(width: int, height: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def test_crop_boxes_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for width, height in [(224, 224), (300, 200), (50, 400)]:
        for _ in range(200):
            left, top, w, h = decode.random_resized_crop_box(width, height, rng)
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            if (width, height) != (50, 400):  # far outside 3/4..4/3: falls back to a centred crop
                assert 0.9 - 0.02 <= w * h / (width * height) <= 1.0
                assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    assert decode.random_resized_crop_box(50, 400, rng) == (0, 166, 50, 67)  # 50 / (3/4) rows, centred


def test_decode_is_deterministic_and_draft_matches_full_decode():
    data = smooth_jpeg(640, 480)
    a = decode.decode_and_crop(data, (24, 32), np.random.default_rng(5))
    b = decode.decode_and_crop(data, (24, 32), np.random.default_rng(5))
    assert a.shape == (24, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, decode.decode_and_crop(data, (24, 32), np.random.default_rng(6)))
    left, top, w, h = decode.random_resized_crop_box(640, 480, np.random.default_rng(5))
    full = Image.open(io.BytesIO(data)).convert("RGB").crop((left, top, left + w, top + h))
    reference = np.asarray(full.resize((32, 24), Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(a - reference).mean() < 3  # draft (1/8 DCT scale here) only changes round-off
    mirrored = [np.array_equal(decode.decode_and_crop(data, 16, np.random.default_rng(s), flip=True),
                               decode.decode_and_crop(data, 16, np.random.default_rng(s))[:, ::-1])
                for s in range(10)]
    assert any(mirrored) and not all(mirrored)  # flipping is a coin toss, and off by default


# ----------------------------------------------------------------------------- bad input


def damage(i, files):
    """Shard 0 holds one sample of each per-sample defect."""
    files = dict(files)
    if i == 1:
        files["jpg"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    elif i == 2:
        files["jpg"] = tiny_jpeg(2, size=64)[:300]  # truncated JPEG
    elif i == 3:
        del files["jpg"]
    elif i == 4:
        del files["com.txt"]
    elif i == 5:
        files["com.txt"] = b"  \n"
    elif i == 6:
        files["com.txt"] = b"\xff\xfe a photo of bird 6."  # not UTF-8
    return files


@pytest.fixture
def damaged(tmp_path):
    """4 shards of 10: per-sample defects in shard 0, shard 1 truncated inside sample 17."""
    paths = write_shards(tmp_path / "bad", 40, 10, edit=damage)
    with open(paths[1], "r+b") as f:
        f.truncate(int(os.path.getsize(paths[1]) * 0.75))
    return paths


def test_every_bad_input_is_skipped_and_counted(damaged):
    source = TarShardSource(damaged)
    truncated_cut = source.indexes[1].truncated_sample  # samples of shard 1 up to the cut survive
    ds = dataset(damaged, global_batch_size=4, num_epochs=1)
    os.remove(damaged[2])  # becomes unreadable after indexing
    batches = list(ds)
    total = sum(b["skipped"] for b in batches)
    expected = {"corrupt_image": 2, "missing_image": 1, "missing_caption": 2, "truncated_tar": 1,
                "unreadable_shard": 10, "corrupt_caption": 1}
    assert dict(zip(SKIP_REASONS, total.tolist())) == expected
    assert len(batches) == (10 + truncated_cut + 1 + 10 + 10) // 4
    used = sample_of_tokens(np.concatenate([b["tokens"] for b in batches]), 40)
    bad = {1, 2, 3, 4, 5, 6, *range(10 + truncated_cut, 30)}
    assert not bad & set(used)
    bad_shards = {int(b["last_bad_shard"]) for b in batches if b["skipped"].any()}
    assert bad_shards <= {0, 1, 2} and 2 in bad_shards
    assert all(b["last_bad_shard"] == -1 for b in batches if not b["skipped"].any())


def test_caption_that_is_not_utf8_is_skipped_not_trained_on(tmp_path):
    """Decoded with replacement characters, it would teach the model a mangled name."""
    write_shards(tmp_path, 8, 8, edit=lambda i, files: {**files, "com.txt": b"\xff\xfe a photo"} if i == 3 else files)
    batches = list(dataset(str(tmp_path), global_batch_size=4, num_epochs=1))
    total = sum(b["skipped"] for b in batches)
    assert dict(zip(SKIP_REASONS, total.tolist())) == {**dict.fromkeys(SKIP_REASONS, 0), "corrupt_caption": 1}
    used = sample_of_tokens(np.concatenate([b["tokens"] for b in batches]), 8)
    assert len(used) == 8 and 3 not in used
    assert [int(b["last_bad_shard"]) for b in batches if b["skipped"].any()] == [0]


def test_all_bad_data_raises_a_clear_error(tmp_path):
    write_shards(tmp_path, 8, 8, edit=lambda i, files: {k: v for k, v in files.items() if k != "jpg"})
    with pytest.raises(BadDataError, match="all unusable"):
        next(iter(dataset(str(tmp_path), global_batch_size=4, read_threads=1)))


def test_unreadable_shards_at_index_time(tmp_path):
    write_shards(tmp_path, 30, 10)
    with open(tmp_path / "shard-000001.tar", "wb") as f:
        f.write(b"\0garbage" * 100)
    with pytest.raises(BadDataError, match=r"1 of 3 shards cannot be read.*shard-000001.tar"):
        dataset(str(tmp_path))
    batches = take(iter(dataset(str(tmp_path), max_bad_fraction=0.5)), 3)
    assert not set(sample_of_tokens(np.concatenate([b["tokens"] for b in batches]), 30)) & set(range(10, 20))


def test_skip_budget_names_reason_and_shard(damaged):
    batches = list(dataset(damaged, global_batch_size=4, num_epochs=1))
    budget = SkipBudget(0.01, shards=damaged, window_samples=1000, min_samples=10)
    with pytest.raises(BadDataError) as error:
        for batch in batches:
            budget.update(4, batch["skipped"], batch["last_bad_shard"])
    message = str(error.value)
    assert "more than the allowed 1.0%" in message and "mostly" in message
    assert any(reason in message for reason in SKIP_REASONS)
    assert any(os.path.basename(path) in message for path in damaged)


def test_skip_budget_window_and_threshold():
    budget = SkipBudget(0.1, shards=["a.tar", "b.tar"], window_samples=100, min_samples=50)
    bad = np.zeros(len(SKIP_REASONS), np.int32)
    bad[SKIP_REASONS.index("missing_caption")] = 4
    budget.update(10, bad, 1)  # 40% but only 10 samples seen: not judged yet
    for _ in range(9):
        budget.update(10, np.zeros_like(bad))
    assert budget.fraction == pytest.approx(0.04)
    for _ in range(10):  # the bad batch slides out of the window
        budget.update(10, np.zeros_like(bad))
    assert budget.fraction == 0
    budget.update(10, bad, 1)
    budget.update(10, bad, 1)
    with pytest.raises(BadDataError, match=r"12 of the last 100 samples \(12.0%\).*missing_caption.*b\.tar"):
        budget.update(10, bad, 1)


def test_bad_arguments_are_explained(shards):
    with pytest.raises(ValueError, match="divisible by process_count"):
        dataset(shards, global_batch_size=6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        dataset(shards, process_index=2, process_count=2)
    assert pipeline.caption_member("taxon_com") == "taxon_com.txt"
