"""Prediction inputs streamed from folders, manifests, training shards and files (data.image_inputs)."""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
import tarfile
import time
import tracemalloc

import numpy as np
import pytest
from etils import epath
from PIL import Image

import bioclip_jax
from bioclip_jax import inference, transforms
from bioclip_jax.cli import main as cli
from bioclip_jax.data import image_items
from bioclip_jax.data import image_inputs
from bioclip_jax.data.image_inputs import (PATH_COLUMNS, ImageInputs, iter_image_inputs, missing_sources,
                                            process_slice)
from bioclip_jax.data.tar_source import TarShardSource
from bioclip_jax.ingest.convert import convert_to_array_record
from collection_helpers import write_collection
from gcs_server import gcs_bucket, gcs_dir  # noqa: F401 - fixtures
from io_helpers import counting_file

BATCH = 4  # one batch shape for every embedder here: compiled once


@pytest.fixture(scope="module")
def embedder():
    model = bioclip_jax.create_model("ViT-Tiny-8", seed=0)
    return inference.ImageEmbedder(model, batch_size=BATCH, workers=2, progress=False)


def _pixels(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size + 3, 3), dtype=np.uint8)


def _save(path, seed: int) -> np.ndarray:
    """A small lossless image at `path` (PNG); returns its pixels."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = _pixels(seed)
    Image.fromarray(pixels).save(path, format="PNG")
    return pixels


def _keys(items) -> list[str]:
    return [item.key for item in items]


def _opened(item) -> np.ndarray:
    return np.asarray(item.open())


def _embed(embedder, items) -> inference.ImageEmbeddings:
    embedder.skipped.clear()
    return embedder.embed_all(items)


# ---- folders ---------------------------------------------------------------------------------------------


def test_a_folder_streams_nested_images_in_list_image_files_order(tmp_path, monkeypatch):
    root = tmp_path / "photos"
    for name in ("b/2.JPG", "b/1.png", "b/notes.txt", "a.jpeg", "a/z/9.gif", "a/0.webp", "c/empty.csv", "Z.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    want = [f"{root}/{name}" for name in ("Z.png", "a.jpeg", "a/0.webp", "a/z/9.gif", "b/1.png", "b/2.JPG")]

    walked = []
    walk = os.walk

    def watched_walk(top, *args, **kwargs):
        for entry in walk(top, *args, **kwargs):
            walked.append(entry[0])
            yield entry

    monkeypatch.setattr(os, "walk", watched_walk)
    items = iter_image_inputs([str(root)])
    assert next(items).key == want[0] and walked == [str(root)]  # the first image comes before the subfolders
    assert [want[0], *_keys(items)] == want == image_items.list_image_files([str(root)])


# ---- manifests -------------------------------------------------------------------------------------------


def _write_csv(path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)


@pytest.mark.parametrize("column", [*PATH_COLUMNS, "File_Name", " IMAGE "])
def test_a_csv_manifest_finds_its_path_column_by_name(tmp_path, column):
    _save(tmp_path / "images" / "a.png", 1)
    _write_csv(tmp_path / "list.csv", [["species", column, "notes"], ["Corvus corax", "images/a.png", "x"],
                                       ["", "", ""], ["Pica pica", "images/b.png", "y"]])
    assert _keys(iter_image_inputs([str(tmp_path / "list.csv")])) == [f"{tmp_path}/images/a.png",
                                                                      f"{tmp_path}/images/b.png"]


def test_a_csv_manifest_takes_path_column_and_says_how_when_it_has_no_path_column(tmp_path):
    manifest = tmp_path / "list.csv"
    _write_csv(manifest, [["photo", "path"], ["a.png", "ignored.png"]])
    assert _keys(iter_image_inputs([str(manifest)], path_column="PHOTO")) == [f"{tmp_path}/a.png"]
    assert _keys(iter_image_inputs([str(manifest)])) == [f"{tmp_path}/ignored.png"]
    with pytest.raises(ValueError, match=r"has no column 'shot' \(its columns: photo, path\)"):
        iter_image_inputs([str(manifest)], path_column="shot")
    _write_csv(manifest, [["photo", "species"], ["a.png", "Corvus corax"]])
    with pytest.raises(ValueError) as raised:  # raised up front, before any image
        iter_image_inputs([str(tmp_path), str(manifest)])
    assert str(raised.value).startswith(f"manifest {manifest} has no path column (its columns: photo, species)")
    assert "--path-column" in str(raised.value) and str(raised.value).count(".") <= 2  # one sentence
    manifest.write_text("\ufeffPath,species\nb.png,x\n", encoding="utf-8")  # as a spreadsheet saves UTF-8
    assert _keys(iter_image_inputs([str(manifest)])) == [f"{tmp_path}/b.png"]


def test_a_txt_manifest_skips_comments_and_blank_lines_and_resolves_relative_entries(tmp_path):
    elsewhere = tmp_path / "elsewhere" / "c.png"
    pixels = {"a": _save(tmp_path / "lists" / "imgs" / "a.png", 1), "c": _save(elsewhere, 3)}
    manifest = tmp_path / "lists" / "list.txt"
    manifest.write_text(f"# exported 2024\n\nimgs/a.png\n   \n  {elsewhere}  \r\n#imgs/b.png\n../elsewhere/c.png\n")
    items = list(iter_image_inputs([str(manifest)]))
    assert _keys(items) == [f"{tmp_path}/lists/imgs/a.png", str(elsewhere), f"{tmp_path}/lists/../elsewhere/c.png"]
    for item, name in zip(items, "acc"):
        np.testing.assert_array_equal(_opened(item), pixels[name])


def test_a_manifest_entry_that_does_not_exist_is_skipped_with_its_reason(tmp_path, embedder):
    _save(tmp_path / "a.png", 1)
    _write_csv(tmp_path / "list.csv", [["filename", "species"], ["a.png", "x"], ["gone.png", "y"], ["", "z"]])
    assert missing_sources([str(tmp_path / "list.csv"), str(tmp_path / "nope.txt")]) == [str(tmp_path / "nope.txt")]
    items = iter_image_inputs([str(tmp_path / "list.csv"), str(tmp_path / "nope.txt")])  # nope: warned, skipped
    out = _embed(embedder, items)
    assert out.keys == [f"{tmp_path}/a.png"] and np.isfinite(out.features).all()
    reasons = {entry.key: entry.reason for entry in out.skipped}
    assert list(reasons) == [f"{tmp_path}/gone.png", f"{tmp_path}/list.csv:4"]
    assert reasons[f"{tmp_path}/gone.png"].startswith("FileNotFoundError")
    assert reasons[f"{tmp_path}/list.csv:4"] == f"UnreadableInput: line 4 of {tmp_path}/list.csv has no image path"


def test_a_gs_manifest_of_gs_images_and_a_gs_folder(gcs_dir, tmp_path):
    pixels = {name: _pixels(seed) for seed, name in enumerate(("a", "b", "c"))}
    for name, values in pixels.items():
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, format="PNG")
        epath.Path(f"{gcs_dir}/photos/{'sub/' if name == 'c' else ''}{name}.png").write_bytes(buffer.getvalue())
    epath.Path(f"{gcs_dir}/lists/list.txt").write_text(f"../photos/a.png\n{gcs_dir}/photos/sub/c.png\nmissing.png\n")
    manifest_items = list(iter_image_inputs([f"{gcs_dir}/lists/list.txt"]))
    assert _keys(manifest_items) == [f"{gcs_dir}/lists/../photos/a.png", f"{gcs_dir}/photos/sub/c.png",
                                     f"{gcs_dir}/lists/missing.png"]
    np.testing.assert_array_equal(_opened(manifest_items[1]), pixels["c"])
    with pytest.raises(FileNotFoundError):
        manifest_items[2].open()
    folder_items = list(iter_image_inputs([f"{gcs_dir}/photos"]))
    assert _keys(folder_items) == [f"{gcs_dir}/photos/a.png", f"{gcs_dir}/photos/b.png",
                                   f"{gcs_dir}/photos/sub/c.png"]
    for item, name in zip(folder_items, "abc"):
        np.testing.assert_array_equal(_opened(pickle.loads(pickle.dumps(item))), pixels[name])
    assert missing_sources([f"{gcs_dir}/photos", f"{gcs_dir}/nothing"]) == [f"{gcs_dir}/nothing"]


def test_shards_in_gs(gcs_dir, shards):
    out, stored, array_records = shards
    local_shard = out / "train" / "shard-000001.tar"
    epath.Path(f"{gcs_dir}/shard-000001.tar").write_bytes(local_shard.read_bytes())
    items = list(iter_image_inputs([f"{gcs_dir}/shard-*.tar"]))
    assert _keys(items) == _keys(iter_image_inputs([str(local_shard)])) and len(items) == 4
    for item in items:
        np.testing.assert_array_equal(_opened(item), np.asarray(Image.open(io.BytesIO(stored[item.key]))))
    remote = f"{gcs_dir}/shard-000000.array_record"
    epath.Path(remote).write_bytes((array_records / "shard-000000.array_record").read_bytes())
    with pytest.raises(ValueError, match=f"read from local paths only, not {remote}: mount the bucket"):
        iter_image_inputs([remote])


def test_a_million_line_manifest_yields_at_once_and_is_never_held(tmp_path):
    manifest = tmp_path / "big.txt"
    lines = 1_000_000
    with open(manifest, "w") as handle:
        handle.writelines(f"images/{n:07d}.jpg\n" for n in range(lines))
    size = manifest.stat().st_size
    start = time.perf_counter()
    items = iter_image_inputs([str(manifest)])
    assert next(items).key == f"{tmp_path}/images/0000000.jpg"
    assert time.perf_counter() - start < 1.0
    tracemalloc.start()
    try:
        for n, item in zip(range(1, 20_000), items):
            assert item.key.endswith(f"{n:07d}.jpg")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < size / 20  # the lines read so far alone are a third of the file; all of them, 4 x its size


# ---- shards ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(make-shards output, {sample key: its stored JPEG}, ArrayRecord copy of train/)."""
    root = tmp_path_factory.mktemp("shards")
    write_collection(root / "photos", species=3, images=3, size=24)
    out = root / "out"
    assert cli.main(["make-shards", "--folder", str(root / "photos"), "--output", str(out), "--held-out-images",
                     "0", "--samples-per-shard", "4", "--no-progress", "--threads", "1"]) == 0
    source = TarShardSource(str(out / "train"))
    stored = {sample["__key__"]: sample["jpg"] for sample in (source[i] for i in range(len(source)))}
    convert_to_array_record(source, str(root / "array_record"), records_per_file=5)
    return out, stored, root / "array_record"


def _catalog_keys(out) -> list[str]:
    with open(out / "catalog.csv", encoding="utf-8") as handle:
        return [row["key"] for row in csv.DictReader(handle) if row["split"] == "train"]


@pytest.mark.parametrize("pattern", ["train/*.tar", "train/shard-{000000..000002}.tar", "array_record/*",
                                     "array_record/shard-000001.array_record"])
def test_shards_give_every_sample_once_with_its_image(shards, pattern):
    out, stored, array_records = shards
    base = out if pattern.startswith("train") else array_records.parent
    items = [pickle.loads(pickle.dumps(item)) for item in iter_image_inputs([f"{base}/{pattern}"])]
    keys = _keys(items)
    if pattern.endswith("000001.array_record"):
        assert keys == _catalog_keys(out)[5:9]
    else:
        assert keys == sorted(_catalog_keys(out)) and len(keys) == len(set(keys)) == 9  # joins catalog.csv
    for item in items:
        np.testing.assert_array_equal(_opened(item), np.asarray(Image.open(io.BytesIO(stored[item.key]))))


def test_a_damaged_shard_gives_its_readable_samples_and_one_unreadable_item(shards, tmp_path, embedder):
    out, stored, _ = shards
    shard = tmp_path / "cut.tar"
    data = (out / "train" / "shard-000000.tar").read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert missing_sources([str(tmp_path / "*.tar"), str(tmp_path / "none-*.tar")]) == [str(tmp_path / "none-*.tar")]
    embedded = _embed(embedder, iter_image_inputs([str(tmp_path / "*.tar")]))
    in_shard = list(TarShardSource(str(out / "train" / "shard-000000.tar")).indexes[0].starts)
    assert 0 < len(embedded.keys) < len(in_shard) and set(embedded.keys) < set(stored)
    assert [entry.key for entry in embedded.skipped] == [f"{shard}#rest"]
    assert f"{shard} cannot be read after sample" in embedded.skipped[0].reason


# ---- files, slices, odd images ---------------------------------------------------------------------------


def test_process_slices_partition_the_stream(tmp_path):
    for n in range(11):
        (tmp_path / f"{n:02d}.png").write_bytes(b"")
    everything = _keys(iter_image_inputs([str(tmp_path)]))
    for count in (2, 3):
        shares = [_keys(process_slice(iter_image_inputs([str(tmp_path)]), index, count)) for index in range(count)]
        assert sorted(key for share in shares for key in share) == everything
        assert [len(share) for share in shares] == [len(everything[i::count]) for i in range(count)]
        assert all(share == everything[index::count] for index, share in enumerate(shares))
    with pytest.raises(ValueError, match="process index 2 of 2"):
        process_slice([], 2, 2)


def _shares(inputs: ImageInputs, count: int) -> list[list[str]]:
    """Each process's keys; checks that `keys()` lists the same share as `items()` without opening anything."""
    shares = [_keys(inputs.items(index, count)) for index in range(count)]
    assert [list(inputs.keys(index, count)) for index in range(count)] == shares
    return shares


def test_processes_take_whole_shards_when_there_are_enough(shards, tmp_path, monkeypatch):
    out, stored, _ = shards
    opened = []
    read_tar = image_inputs._tar_items
    monkeypatch.setattr(image_inputs, "_tar_items", lambda shard: opened.append(shard) or read_tar(shard))
    (tmp_path / "list.txt").write_text("a.png\nb.png\nc.png\n")
    paths = sorted(str(path) for path in (out / "train").glob("*.tar"))
    inputs = ImageInputs([str(out / "train" / "*.tar"), str(tmp_path / "list.txt")])
    everything = _keys(inputs.items())
    assert len(paths) == 3 and sorted(everything) == sorted([*stored, *(f"{tmp_path}/{n}.png" for n in "abc")])
    for count in (2, 3):  # no more processes than shards: each reads its own shards only
        for index, share in enumerate(_shares(inputs, count)):
            opened.clear()
            assert _keys(inputs.items(index, count)) == share
            assert opened == paths[index::count]
        assert sorted(key for share in _shares(inputs, count) for key in share) == sorted(everything)
    shares = _shares(inputs, 4)  # more processes than shards: samples are dealt one by one, as files are
    assert shares == [everything[index::4] for index in range(4)]


def test_counting_a_tar_shard_reads_its_headers_only(tmp_path, monkeypatch):
    shard = tmp_path / "big.tar"
    with tarfile.open(shard, "w") as tar:
        for n in range(3):
            for extension, size in (("jpg", 2_000_000), ("txt", 10)):
                info = tarfile.TarInfo(f"sample{n}.{extension}")
                info.size = size
                tar.addfile(info, io.BytesIO(bytes(size)))
    read: list[int] = []
    monkeypatch.setattr(image_inputs, "open_for_scan", counting_file(read))
    inputs = ImageInputs([str(shard)])
    assert list(inputs.keys()) == ["sample0", "sample1", "sample2"] == _keys(inputs.items())
    assert 0 < sum(read) < shard.stat().st_size / 100


def _odd_images(folder) -> dict[str, np.ndarray | None]:
    """Awkward files of the kinds found in real collections -> the RGB pixels each should give (None: unreadable)."""
    os.makedirs(folder)
    rgb = _pixels(7, 16)
    want: dict[str, np.ndarray | None] = {}
    ramp = (np.arange(16 * 19, dtype=np.uint32).reshape(16, 19) * 200).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "deep16.png")
    want["deep16.png"] = np.repeat(np.round(ramp / 257.0).astype(np.uint8)[..., None], 3, axis=-1)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    want["cmyk.jpg"] = rgb
    palette = Image.fromarray(rgb).quantize(16)
    palette.save(folder / "palette.gif")
    want["palette.gif"] = np.asarray(palette.convert("RGB"))
    frames = [Image.fromarray(np.full((9, 9, 3), value, np.uint8)) for value in (40, 200)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    want["animated.gif"] = np.full((9, 9, 3), 40, np.uint8)
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    want["rgba.png"] = rgb  # open_clip and pybioclip drop the alpha channel
    Image.fromarray(np.array([[[10, 20, 30]]], np.uint8)).save(folder / "one_pixel.png")
    want["one_pixel.png"] = np.array([[[10, 20, 30]]], np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[:150])
    (folder / "not_an_image.png").write_bytes(b"just text")
    want["truncated.jpg"] = want["not_an_image.png"] = None
    return want


def test_odd_images_embed_and_broken_ones_are_skipped_with_reasons(tmp_path, embedder):
    want = _odd_images(tmp_path / "odd")
    items = list(iter_image_inputs([str(tmp_path / "odd")]))
    for item in items:
        expected = want[os.path.basename(item.key)]
        if expected is not None:
            error = np.abs(_opened(item).astype(int) - expected)
            assert (error.mean() < 2 and error.max() < 12) if item.key.endswith(".jpg") else not error.any(), item.key
    out = _embed(embedder, items)
    assert sorted(os.path.basename(key) for key in out.keys) == sorted(k for k, v in want.items() if v is not None)
    assert out.features.shape == (len(out.keys), embedder.embed_dim) and np.isfinite(out.features).all()
    skipped = {os.path.basename(entry.key): entry.reason for entry in out.skipped}
    assert sorted(skipped) == ["not_an_image.png", "truncated.jpg"]
    assert "cannot identify image file" in skipped["not_an_image.png"]
    assert skipped["truncated.jpg"].startswith("OSError") and "truncated" in skipped["truncated.jpg"].lower()


def test_items_of_the_evaluation_sources_survive_pickling(tmp_path):
    """Decoding processes take evaluation items too: in-memory images must pickle (a lambda did not)."""
    pixels = _save(tmp_path / "a.png", 2)
    for item in (image_items.bytes_item("a", (tmp_path / "a.png").read_bytes(), 3),
                 image_items.file_item(str(tmp_path / "a.png"), 3)):
        copy = pickle.loads(pickle.dumps(item))
        assert (copy.key, copy.label) == (item.key, 3)
        np.testing.assert_array_equal(_opened(copy), pixels)


def test_a_single_file_is_an_item_and_its_open_survives_pickling(tmp_path):
    pixels = _save(tmp_path / "a.png", 5)
    shutil.copy(tmp_path / "a.png", tmp_path / "b.weird")
    items = list(iter_image_inputs([str(tmp_path / "a.png"), str(tmp_path / "b.weird")]))
    assert _keys(items) == [str(tmp_path / "a.png"), str(tmp_path / "b.weird")]
    for item in items:
        np.testing.assert_array_equal(_opened(pickle.loads(pickle.dumps(item))), pixels)
    assert transforms.open_rgb(str(tmp_path / "a.png")).mode == "RGB"
