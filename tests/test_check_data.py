"""check-data and convert-shards, run through their `main(argv)` as a user would."""

from __future__ import annotations

import json
import os
import tarfile

import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from bioclip_jax.cli import check_data, convert_shards
from bioclip_jax.data.array_record import ArrayRecordSampleSource, decode_sample, encode_sample
from bioclip_jax.data.pipeline import SKIP_REASONS
from bioclip_jax.data.tar_source import ERROR, TarShardSource
from test_pipeline import damage
from test_shard_source import write_shards


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOCLIP_JAX_INDEX_CACHE", str(tmp_path / "index_cache"))


def run_json(capsys, *argv):
    status = check_data.main(["--json", "--threads", "2", *argv])
    return status, json.loads(capsys.readouterr().out)


def test_clean_shards_report(tmp_path, capsys):
    write_shards(tmp_path, 22, 10)
    status, report = run_json(capsys, "--shards", str(tmp_path / "shard-{000000..000002}.tar"))
    assert status == 0
    assert run_json(capsys, str(tmp_path / "shard-{000000..000002}.tar")) == (status, report)  # positional too
    shard_files = sorted(str(p) for p in tmp_path.glob("shard-*.tar"))  # as a shell glob passes them
    assert run_json(capsys, *shard_files)[1]["samples"] == 22
    assert (report["shards"], report["samples"], report["usable"]) == (3, 22, 22)
    assert all(entry["count"] == 0 for entry in report["skipped"].values())
    assert report["text_types_present"]["taxon_com"] == 22
    # sample i: order i%3, family i%5, genus i%7, epithet i%11 -> distinct lineages among 22 samples
    lineages = {rank: len({tuple(i % m for m in mods) for i in range(22)})
                for rank, mods in [("order", (3,)), ("family", (3, 5)), ("genus", (3, 5, 7)),
                                   ("species", (3, 5, 7, 11))]}
    assert report["taxa_per_rank"] == {"kingdom": 1, "phylum": 1, "class": 1, **lineages}
    assert report["taxa_parsed_from"] == ["taxonTag.txt"]


def test_bad_samples_counted_with_example_keys(tmp_path, capsys):
    paths = write_shards(tmp_path, 20, 10, edit=damage)
    with open(paths[1], "r+b") as f:
        f.truncate(int(os.path.getsize(paths[1]) * 0.75))
    status, report = run_json(capsys, "--shards", str(tmp_path), "--text-type", "com")
    assert status == 1
    counts = {reason: entry["count"] for reason, entry in report["skipped"].items()}
    assert counts == {"corrupt_image": 2, "missing_image": 1, "missing_caption": 2, "truncated_tar": 1,
                      "unreadable_shard": 0, "corrupt_caption": 1}
    assert report["skipped"]["corrupt_image"]["examples"] == ["s00001", "s00002"]
    assert report["skipped"]["missing_caption"]["examples"] == ["s00004", "s00005"]
    assert report["skipped"]["corrupt_caption"]["examples"] == ["s00006"]
    assert report["usable"] == report["samples"] - 7
    assert "truncated" in report["shard_problems"][paths[1]]
    # without a text type, one caption of any type is enough: s00004 to s00006 still have others
    status, report = run_json(capsys, "--shards", str(tmp_path))
    assert report["skipped"]["missing_caption"]["count"] == report["skipped"]["corrupt_caption"]["count"] == 0


def test_captions_that_are_not_utf8_are_reported(tmp_path, capsys):
    def mangle(i, files):
        if i == 1:  # only the common-name caption
            return {**files, "com.txt": b"\xff\xfe a photo"}
        if i == 2:  # every caption
            return {ext: data if ext == "jpg" else b"\xff" + data for ext, data in files.items()}
        return files

    write_shards(tmp_path, 4, 10, edit=mangle)
    status, report = run_json(capsys, "--shards", str(tmp_path), "--text-type", "com")
    assert status == 1 and report["usable"] == 2
    assert report["skipped"]["corrupt_caption"] == {"count": 2, "examples": ["s00001", "s00002"]}
    assert report["text_types_present"]["com"] == 2 and report["text_types_present"]["sci"] == 3
    status, report = run_json(capsys, "--shards", str(tmp_path))  # any one caption will do
    assert report["skipped"]["corrupt_caption"] == {"count": 1, "examples": ["s00002"]}
    assert check_data.main(["--shards", str(tmp_path)]) == 1
    line = next(line for line in capsys.readouterr().out.splitlines() if "corrupt_caption" in line)
    assert line.split() == ["corrupt_caption", "1", "e.g.", "s00002"]


def test_text_report_and_errors(tmp_path, capsys):
    write_shards(tmp_path, 4, 10)
    assert check_data.main(["--shards", str(tmp_path), "--text-type", "random"]) == 0
    out = capsys.readouterr().out
    assert "samples: 4" in out and "usable:  4 (100.00%) for text type random" in out
    for reason in SKIP_REASONS:
        assert reason in out
    assert "distinct taxa per rank (from taxonTag.txt): kingdom 1" in out
    assert check_data.main(["--shards", str(tmp_path / "shard-{000000..000003}.tar")]) == 2  # a missing input
    assert "shard-000001.tar does not exist" in capsys.readouterr().err
    assert check_data.main(["--shards", str(tmp_path), "--text-type", "nonsense"]) == 1
    assert "unknown text type" in capsys.readouterr().err


def test_convert_shards_round_trip(tmp_path, capsys):
    write_shards(tmp_path / "tar", 25, 10)
    out = tmp_path / "ar"
    assert convert_shards.main(["--in", str(tmp_path / "tar"), "--output", str(out), "--records-per-file", "10"]) == 0
    assert "wrote 25 samples from 3 shards into 3 files" in capsys.readouterr().out
    tar, records = TarShardSource(str(tmp_path / "tar")), ArrayRecordSampleSource(str(out))
    assert len(records) == len(tar) == 25
    for i in range(25):
        expected, got = tar[i], records[i]
        assert got["__shard__"] == i // 10
        assert {k: v for k, v in got.items() if k != "__shard__"} == {
            k: v for k, v in expected.items() if k != "__shard__"}
    status, report = run_json(capsys, "--shards", str(out / "*.array_record"))
    assert status == 0 and report["usable"] == 25


def test_convert_leaves_out_unreadable_samples(tmp_path, capsys):
    (path,) = write_shards(tmp_path / "tar", 6, 10)
    with tarfile.open(path) as archive:
        cut = next(m for m in archive if m.name == "s00004.jpg")
    with open(path, "r+b") as f:
        f.truncate(cut.offset_data + 10)
    assert convert_shards.main(["--in", path, "--output", str(tmp_path / "ar")]) == 0
    assert "left out 1 samples (truncated_tar), e.g. s00004" in capsys.readouterr().out
    assert [ArrayRecordSampleSource(str(tmp_path / "ar"))[i]["__key__"] for i in range(4)] == [
        f"s{i:05d}" for i in range(4)]


def test_record_format_rejects_damage(tmp_path):
    sample = {"__key__": "k1", "__shard__": 3, "jpg": b"\xff\xd8", "com.txt": b"a photo of x."}
    record = encode_sample(sample)
    assert decode_sample(record) == {"__key__": "k1", "jpg": b"\xff\xd8", "com.txt": b"a photo of x."}
    for broken in (record[:-3], b"XXXX" + record[4:], record + b"\0"):
        with pytest.raises(ValueError, match="malformed|magic"):
            decode_sample(broken)
    damaged = tmp_path / "damaged.array_record"
    writer = ArrayRecordWriter(str(damaged), "group_size:1")
    writer.write(record)
    writer.write(record[:-3])
    writer.close()
    source = ArrayRecordSampleSource(str(damaged))
    assert source[0]["__key__"] == "k1"
    assert source[1][ERROR] == "unreadable_shard" and "malformed" in source[1]["__detail__"]
    bogus = tmp_path / "bogus.array_record"
    bogus.write_bytes(b"not an array record file")
    source = ArrayRecordSampleSource(str(bogus))
    assert len(source) == 0 and "cannot read" in source.problems[str(bogus)]
