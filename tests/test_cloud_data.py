"""gs:// data paths against a live local GCS server: the same batches, samples, eval data and taxa as on disk."""

from __future__ import annotations

import os
import pickle
import uuid

import gcsfs
import numpy as np
import pytest
from etils import epath

from bioclip_jax import taxa_embeddings
from bioclip_jax.data import array_record, eval_sources, index_cache, shard_index
from bioclip_jax.data.pipeline import make_train_dataset
from bioclip_jax.data.tar_source import TarShardSource
from bioclip_jax.ingest.convert import convert_to_array_record
from bioclip_jax.synthetic.dataset import make_synthetic
from gcs_server import gcs_bucket  # noqa: F401
from test_pipeline import assert_batches_equal, take

TRAIN = "train/shard-{000000..000003}.tar"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory, gcs_bucket):
    """(local folder, gs:// prefix) holding the same small synthetic tree of life, byte for byte."""
    local = tmp_path_factory.mktemp("synthetic")
    make_synthetic(str(local), species=12, images_per_species=4, held_out_species=3, seed=5, image_size=32,
                   samples_per_shard=9)
    remote = f"{gcs_bucket}/synthetic-{uuid.uuid4().hex[:8]}"
    for file in sorted(local.rglob("*")):
        if file.is_file():
            epath.Path(remote, file.relative_to(local).as_posix()).write_bytes(file.read_bytes())
    return local, remote


@pytest.fixture(autouse=True)
def _public_bucket(synthetic, tmp_path, monkeypatch):
    """The shards sit in a read-only bucket, as TreeOfLife-10M would; and no test may leave a local
    directory named "gs:" behind (what a gs:// path handled as a local one creates)."""
    _, remote = synthetic
    write = index_cache.write_atomically

    def refuse(target, text):
        if os.fspath(target).startswith(f"{remote}/train/"):
            raise PermissionError(13, "read-only bucket", os.fspath(target))
        write(target, text)

    monkeypatch.setattr(index_cache, "write_atomically", refuse)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(index_cache.CACHE_DIR_ENV, str(tmp_path / "index_cache"))
    yield
    assert not os.path.exists(tmp_path / "gs:")


def test_train_batches_from_gs_equal_local_ones(synthetic, tmp_path, monkeypatch):
    local, remote = synthetic
    assert len(list((local / "train").glob("*.tar"))) == 4
    cache = f"{remote}/index_cache"
    options = dict(global_batch_size=8, seed=3, text_type="per_sample", tokenizer="ViT-B-16", image_size=24)
    from_gcs = take(iter(make_train_dataset(f"{remote}/{TRAIN}", cache_dir=cache, **options)), 5)
    from_disk = take(iter(make_train_dataset(str(local / TRAIN), cache_dir=str(tmp_path / "cache"), **options)), 5)
    assert_batches_equal(from_gcs, from_disk)
    cached = sorted(path.name for path in epath.Path(cache).iterdir())
    assert [name.split(".")[0] for name in cached] == [f"shard-{i:06d}" for i in range(4)]
    assert all(name.endswith(shard_index.INDEX_SUFFIX) for name in cached)
    assert not list(epath.Path(remote, "train").glob(f"*{shard_index.INDEX_SUFFIX}"))

    monkeypatch.setattr(index_cache, "build_shard_index", lambda path: pytest.fail(f"{path} indexed again"))
    again = make_train_dataset(f"{remote}/train/shard-*.tar", cache_dir=cache, worker_count=1, **options)
    iterator = iter(again)  # a Grain worker process gets the pickled source and reopens the shards
    try:
        assert_batches_equal(take(iterator, 2), from_gcs[:2])
    finally:
        iterator.close()


def test_gs_samples_are_the_local_bytes_and_survive_pickling(synthetic):
    local, remote = synthetic
    on_disk = TarShardSource(str(local / "train"))
    on_gcs = pickle.loads(pickle.dumps(TarShardSource(f"{remote}/train")))  # a directory: its *.tar
    assert on_gcs.shard_paths == [f"{remote}/train/shard-{i:06d}.tar" for i in range(4)]
    assert len(on_gcs) == len(on_disk)
    for i in reversed(range(len(on_disk))):  # random access, by ranged reads
        assert on_gcs[i] == on_disk[i]
    on_gcs.close()


def test_a_sample_read_fetches_only_its_bytes(synthetic, monkeypatch):
    """Global shuffling reads ~30 KB samples at random offsets: read-ahead would download megabytes each."""
    _, remote = synthetic
    source = TarShardSource(f"{remote}/train")
    fetched = []
    fetch = gcsfs.core.GCSFile._fetch_range
    monkeypatch.setattr(gcsfs.core.GCSFile, "_fetch_range",
                        lambda self, start, end: fetched.append(end - start) or fetch(self, start, end))
    wanted = [20, 3, 4, 35]
    for i in wanted:
        source[i]
    sizes = np.concatenate([index.ends - index.starts for index in source.indexes])
    assert fetched == sizes[wanted].tolist()


def test_eval_folder_shards_and_taxa_files_from_gs(synthetic):
    local, remote = synthetic
    folder = eval_sources.open_eval_data(f"folder:{remote}/held_out/images")
    expected = eval_sources.open_eval_data(f"folder:{local}/held_out/images")
    assert folder.has_taxonomy  # held_out/taxa.csv, found next to the folder in the bucket
    assert (folder.name, folder.classes, len(folder)) == (expected.name, expected.classes, len(expected))
    for got, want in zip(folder.items(), expected.items()):
        assert got.key.startswith(f"{remote}/held_out/images/") and got.label == want.label
        with got.open() as image, want.open() as reference:
            np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))
    assert eval_sources.open_eval_data(f"{remote}/held_out/images").classes == expected.classes  # bare gs:// dir

    shards = eval_sources.open_eval_data(f"shards:{remote}/train/*.tar", taxa=f"{remote}/taxa.csv")
    reference = eval_sources.open_eval_data(f"shards:{local}/train/*.tar", taxa=str(local / "taxa.csv"))
    assert shards.classes == reference.classes and shards.has_taxonomy
    assert [(i.key, i.label) for i in shards.items()] == [(i.key, i.label) for i in reference.items()]

    taxa, skipped = taxa_embeddings.read_catalog_taxa(f"{remote}/catalog.csv")
    assert (taxa, skipped) == taxa_embeddings.read_catalog_taxa(str(local / "catalog.csv")) and len(taxa) == 12


def test_array_record_conversion_to_gs(synthetic):
    local, remote = synthetic
    out = f"{remote}/array_record"
    report = convert_to_array_record(TarShardSource(str(local / "train")), out, records_per_file=20)
    assert report.paths == [f"{out}/shard-{i:06d}.array_record" for i in range(2)]
    assert sorted(path.name for path in epath.Path(out).iterdir()) == ["shard-000000.array_record",
                                                                       "shard-000001.array_record"]
    with pytest.raises(ValueError, match="gcsfuse"):  # the C++ reader opens local files only
        array_record.ArrayRecordSampleSource(out)
