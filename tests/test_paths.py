"""The one atomic writer (`paths.atomic_local_file`, `paths.write_atomically`), local and gs://.

Hosts of a pod write the same files (config.json, a shard index, results) into a shared folder;
each writer must go through a temporary name of its own, or one renames another's half-written file.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from etils import epath

from bioclip_jax import paths
from gcs_server import gcs_bucket, gcs_dir  # noqa: F401 - fixtures


def test_two_writers_at_once_in_many_processes(tmp_path):
    """Two processes rewrite one file as fast as they can: neither fails, the file is always one of
    the two whole payloads, and no temporary file is left behind."""
    target, start = tmp_path / "config.json", tmp_path / "start"
    writer = textwrap.dedent(f"""
        import os, sys, time
        from bioclip_jax import paths
        while not os.path.exists({os.fspath(start)!r}):
            time.sleep(0.001)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            paths.write_atomically({os.fspath(target)!r}, sys.argv[1] * 100_000)
    """)
    processes = [subprocess.Popen([sys.executable, "-c", writer, letter], stderr=subprocess.PIPE, text=True)
                 for letter in "ab"]
    start.touch()
    errors = [process.communicate(timeout=120)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], errors
    assert target.read_text() in ("a" * 100_000, "b" * 100_000)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "start"]


def test_interleaved_writers_each_finish_whole(tmp_path):
    target = tmp_path / "index.json"
    with paths.atomic_local_file(target) as first:
        with paths.atomic_local_file(target) as second:
            assert first != second
            epath.Path(first).write_text("first, half")
            epath.Path(second).write_text("second")
        assert target.read_text() == "second"
        assert epath.Path(first).read_text() == "first, half"  # the other writer did not take it
        epath.Path(first).write_text("first")
    assert target.read_text() == "first"
    assert os.listdir(tmp_path) == ["index.json"]


@pytest.mark.parametrize("where", ["local", "gs"])
def test_a_writer_that_fails_leaves_the_old_file(where, tmp_path, request):
    folder = request.getfixturevalue("gcs_dir") if where == "gs" else os.fspath(tmp_path)
    target = epath.Path(folder) / "results.json"
    paths.write_atomically(target, "old")
    with pytest.raises(RuntimeError, match="killed"):
        with paths.atomic_local_file(target) as temporary:
            epath.Path(temporary).write_text("new, half")
            raise RuntimeError("killed mid-write")
    assert paths.uncached(target).read_text() == "old"
    assert [p.name for p in paths.uncached(folder).iterdir()] == ["results.json"]
    paths.write_atomically(target, b"new")
    assert paths.uncached(target).read_text() == "new"


def test_a_write_honours_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        paths.write_atomically(tmp_path / "weights.bin", b"\0")
    finally:
        os.umask(previous)
    assert (tmp_path / "weights.bin").stat().st_mode & 0o777 == 0o640
