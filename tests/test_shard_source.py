"""Shard patterns, the cached tar index, and random access to samples (incl. damaged shards)."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from bioclip_jax.data import index_cache, shard_index, source_index, tar_headers
from bioclip_jax.data.braces import expand_braces
from bioclip_jax.data.shard_patterns import ShardNotFoundError, expand_shard_pattern
from bioclip_jax.data.tar_source import ERROR, TarShardSource
from bioclip_jax.data.tar_writer import ShardWriter
from bioclip_jax.taxonomy import Taxon, sample_captions
from io_helpers import counting_file


def tiny_jpeg(seed: int, size: int = 32) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sample_files(i: int) -> dict[str, bytes]:
    """A TreeOfLife-10M style sample: image plus every caption member."""
    taxon = Taxon(kingdom="Animalia", phylum="Chordata", cls="Aves", order=f"Order{i % 3}",
                  family=f"Family{i % 5}", genus=f"Genus{i % 7}", species=f"ep{i % 11}", common=f"bird {i}")
    files = {"jpg": tiny_jpeg(i)}
    files.update({ext: text.encode() for ext, text in sample_captions(taxon).items()})
    return files


def write_shards(out_dir, num_samples: int, per_shard: int, edit=None) -> list[str]:
    """Shards of `num_samples` samples keyed s00000...; `edit(i, files)` may damage a sample."""
    with ShardWriter(str(out_dir), per_shard) as writer:
        for i in range(num_samples):
            files = sample_files(i)
            if edit is not None:
                files = edit(i, files)
            writer.write(f"s{i:05d}", files)
    return writer.shard_paths


def read_members(path: str) -> dict[str, dict[str, bytes]]:
    """Reference reader: every sample of a shard via tarfile's own streaming."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as archive:
        for info in archive:
            key, ext = info.name.split(".", 1)
            samples.setdefault(key, {})[ext] = archive.extractfile(info).read()
    return samples


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "index_cache"
    monkeypatch.setenv(index_cache.CACHE_DIR_ENV, str(directory))
    return directory


# ----------------------------------------------------------------------------- patterns


def test_brace_expansion_forms():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{1..2}") == ["a/x1", "a/x2", "b/x1", "b/x2"]
    assert expand_braces("x{0..4..2}") == ["x0", "x2", "x4"]
    assert expand_braces("{8..10}") == ["8", "9", "10"]
    assert expand_braces("{a,{b,c}}d") == ["ad", "bd", "cd"]
    assert expand_braces("lit{x}") == ["lit{x}"]
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("s-{000..002.tar")


def test_shard_patterns_dirs_globs_and_missing(tmp_path, cache_dir):
    train = write_shards(tmp_path / "train", 6, 2)
    extra = write_shards(tmp_path / "extra", 2, 2)
    assert expand_shard_pattern(str(tmp_path / "train" / "shard-{000000..000002}.tar")) == train
    assert expand_shard_pattern(str(tmp_path / "train")) == train
    assert expand_shard_pattern(str(tmp_path / "train" / "shard-*.tar")) == train
    TarShardSource(train)  # writes shard-*.tar.idx.json beside the shards
    assert expand_shard_pattern(str(tmp_path / "train" / "shard-*")) == train
    joined = f"{tmp_path}/train/shard-{{000000,000002}}.tar::{tmp_path}/extra"
    assert expand_shard_pattern(joined) == [train[0], train[2], extra[0]]
    with pytest.raises(ShardNotFoundError, match=r"shard-000003.tar does not exist \(and 2 more\)"):
        expand_shard_pattern(str(tmp_path / "train" / "shard-{000000..000005}.tar"))
    with pytest.raises(ShardNotFoundError, match="matches no files"):
        expand_shard_pattern(str(tmp_path / "nowhere" / "*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardNotFoundError, match="holds no"):
        expand_shard_pattern(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------- index


def test_random_access_returns_exact_member_bytes(tmp_path, cache_dir):
    paths = write_shards(tmp_path, 7, 3)
    source = TarShardSource(str(tmp_path / "shard-{000000..000002}.tar"))
    assert len(source) == 7
    expected = {}
    for shard, path in enumerate(paths):
        for key, members in read_members(path).items():
            expected[key] = (shard, members)
    for i in [6, 0, 3, 5, 1, 2, 4]:  # out of order on purpose
        sample = source[i]
        shard, members = expected[sample["__key__"]]
        assert sample["__key__"] == f"s{i:05d}"
        assert sample["__shard__"] == shard
        assert {k: v for k, v in sample.items() if not k.startswith("__")} == members
    with pytest.raises(IndexError):
        source[7]


def test_index_cached_beside_shard_and_rebuilt_when_stale(tmp_path, cache_dir, monkeypatch):
    (path,) = write_shards(tmp_path, 3, 10)
    TarShardSource(path)
    cached = path + shard_index.INDEX_SUFFIX
    assert os.path.exists(cached)
    scans = []
    real_build = shard_index.build_shard_index
    monkeypatch.setattr(index_cache, "build_shard_index", lambda p: scans.append(p) or real_build(p))
    assert len(TarShardSource(path)) == 3
    assert scans == []  # served from the cache
    write_shards(tmp_path, 5, 10)  # same name, new content: size and mtime change
    source = TarShardSource(path)
    assert scans == [path] and len(source) == 5
    assert source[4]["__key__"] == "s00004"


def test_index_scan_skips_payloads(tmp_path, cache_dir, monkeypatch):
    def big(i, files):
        return {**files, "jpg": os.urandom(200_000)}

    (path,) = write_shards(tmp_path, 4, 10, edit=big)
    read_bytes: list[int] = []
    monkeypatch.setattr(shard_index, "open_for_scan", counting_file(read_bytes))
    assert len(TarShardSource(path)) == 4
    assert 0 < sum(read_bytes) < 0.05 * os.path.getsize(path)


def test_read_only_data_dir_uses_cache_dir(tmp_path, cache_dir, monkeypatch):
    (path,) = write_shards(tmp_path / "data", 4, 10)
    real_write = index_cache.write_atomically

    def refuse_data_dir(target, text):
        if os.fspath(target).startswith(str(tmp_path / "data")):
            raise PermissionError(13, "Read-only file system", os.fspath(target))
        real_write(target, text)

    monkeypatch.setattr(index_cache, "write_atomically", refuse_data_dir)
    assert len(TarShardSource(path)) == 4
    assert not os.path.exists(path + shard_index.INDEX_SUFFIX)
    cached = list(cache_dir.glob(f"*{shard_index.INDEX_SUFFIX}"))
    assert len(cached) == 1 and cached[0].name.startswith("shard-000000.tar.")
    shutil.rmtree(source_index.index_directory(str(cache_dir)))  # the per-shard cache alone must serve it
    monkeypatch.setattr(index_cache, "build_shard_index", lambda p: pytest.fail("index rebuilt"))
    assert len(TarShardSource(path)) == 4


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_extended_headers(tmp_path, cache_dir, tar_format):
    """Keys with directories (ustar prefix field) and keys too long for ustar (GNU/pax headers)."""
    keys = ["d" * 120 + "/short", "plain"]
    if tar_format != tarfile.USTAR_FORMAT:
        keys.append("x" * 300)
    path = str(tmp_path / "names.tar")
    with tarfile.open(path, "w", format=tar_format) as archive:
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        archive.addfile(directory)  # directory entries are not samples
        for i, key in enumerate(keys):
            for ext, payload in sample_files(i).items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    source = TarShardSource(path)
    assert [source[i]["__key__"] for i in range(len(source))] == keys
    for i, key in enumerate(keys):
        assert {k: v for k, v in source[i].items() if not k.startswith("__")} == sample_files(i)


@pytest.mark.parametrize("tar_format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT])
def test_ustar_fields_read_as_tarfile_reads_them(tar_format):
    """The fast reader's named header fields (name, prefix, size, type, checksum) agree with tarfile's."""
    names = ["s00000.jpg", "s00000.taxon.txt", "s00001.jpg"]
    if tar_format == tarfile.USTAR_FORMAT:
        names.append("d" * 120 + "/s00002.jpg")  # split over the prefix and name fields
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as archive:
        for size, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * size
            archive.addfile(info, io.BytesIO(bytes(info.size)))
    blob = buffer.getvalue()
    fast = list(tar_headers.plain_members(io.BytesIO(blob), len(blob)))
    assert fast == list(tar_headers.tarfile_members(io.BytesIO(blob)))
    assert [(name, size) for _, name, _, size, _ in fast] == [(name, 700 * i) for i, name in enumerate(names)]


def test_source_pickles_and_reopens(tmp_path, cache_dir):
    write_shards(tmp_path, 4, 2)
    source = TarShardSource(str(tmp_path))
    first = source[3]
    clone = pickle.loads(pickle.dumps(source))
    assert clone[3] == first and clone[0]["__key__"] == "s00000"


# ----------------------------------------------------------------------------- damage


def test_truncated_tar_indexed_up_to_cut(tmp_path, cache_dir):
    (path,) = write_shards(tmp_path, 5, 10)
    members = read_members(path)
    with tarfile.open(path) as archive:
        cut_inside = next(m for m in archive if m.name == "s00003.jpg")
    with open(path, "r+b") as f:
        f.truncate(cut_inside.offset_data + cut_inside.size // 2)
    source = TarShardSource(path)
    assert len(source) == 4
    for i in range(3):
        assert source[i]["__key__"] == f"s{i:05d}" and source[i]["jpg"] == members[f"s{i:05d}"]["jpg"]
    assert source[3] == {"__key__": "s00003", "__shard__": 0, ERROR: "truncated_tar",
                         "__detail__": source[3]["__detail__"]}
    assert "truncated" in source.problems[path] and "s00003" in source.problems[path]


def test_tar_cut_at_member_boundary_is_flagged(tmp_path, cache_dir):
    (path,) = write_shards(tmp_path, 3, 10)
    with tarfile.open(path) as archive:
        last = archive.getmembers()[-1]
    with open(path, "r+b") as f:
        f.truncate(tar_headers.padded(last.offset_data + last.size))  # drop the end-of-archive blocks
    source = TarShardSource(path)
    assert len(source) == 3 and source[2][ERROR] == "truncated_tar"
    assert source[1]["__key__"] == "s00001" and ERROR not in source[1]


def test_damaged_header_ends_the_index_there(tmp_path, cache_dir):
    (path,) = write_shards(tmp_path, 6, 10)
    with tarfile.open(path) as archive:
        damaged = next(m for m in archive if m.name == "s00003.jpg")
    with open(path, "r+b") as f:
        f.seek(damaged.offset)
        f.write(b"\x17garbage" * 8)
    source = TarShardSource(path)
    assert len(source) == 3  # s00002 is the last sample before the damage, so it counts as cut
    assert source[1]["__key__"] == "s00001" and source[2][ERROR] == "truncated_tar"


def test_unreadable_shards_reported_not_fatal(tmp_path, cache_dir):
    paths = write_shards(tmp_path, 4, 2)
    with open(tmp_path / "shard-000002.tar", "wb") as f:
        f.write(b"this is not a tar file" * 40)
    source = TarShardSource(str(tmp_path))
    assert len(source) == 4
    assert "cannot read" in source.problems[str(tmp_path / "shard-000002.tar")]
    os.remove(paths[1])  # vanishes after indexing: reads come back as errors, not exceptions
    assert source[2][ERROR] == "unreadable_shard" and "shard-000001.tar" in source[2]["__detail__"]
    assert source[0]["__key__"] == "s00000"


# ----------------------------------------------------------------------------- one mapped index per host


def test_pickled_source_carries_the_index_file_not_the_index(tmp_path, cache_dir):
    """A Grain worker unpickles the source: at 200M samples the arrays would be 3.2 GB per worker."""
    small = TarShardSource(write_shards(tmp_path / "small", 20, 20))
    large = TarShardSource(write_shards(tmp_path / "large", 400, 400))
    assert len(pickle.dumps(large)) - len(pickle.dumps(small)) < 200  # not 380 more samples * 16 bytes
    copy = pickle.loads(pickle.dumps(large))
    assert isinstance(copy.indexes[0].starts, np.memmap)  # pages shared with every process on the host
    for i in (0, 17, 399):
        assert copy[i] == large[i]


def test_later_processes_map_the_joined_index_without_parsing_shard_indexes(tmp_path, cache_dir, monkeypatch):
    paths = write_shards(tmp_path, 30, 10)
    first = TarShardSource(paths)
    monkeypatch.setattr(shard_index.ShardIndex, "from_json",
                        classmethod(lambda cls, text, path: pytest.fail(f"parsed the index of {path}")))
    again = TarShardSource(paths)
    assert len(again) == 30 and [again[i] for i in (0, 29)] == [first[0], first[29]]


def test_a_source_with_an_unreadable_shard_keeps_its_index_in_memory(tmp_path, cache_dir):
    paths = write_shards(tmp_path, 20, 10)
    with open(paths[1], "wb") as f:
        f.write(b"\0garbage" * 100)
    source = TarShardSource(paths)
    assert list(source.problems) == [paths[1]] and len(source) == 10
    assert not isinstance(source.indexes[0].starts, np.memmap)  # a passing error must not be kept on disk
    assert not os.path.exists(source_index.index_directory(str(cache_dir)))
