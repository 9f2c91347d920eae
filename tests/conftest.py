"""Test-suite setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import tempfile  # noqa: E402

import pytest  # noqa: E402

from bioclip_jax import console  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _index_cache(tmp_path_factory):
    """Joined shard indexes go to a temporary folder, not the user's ~/.cache."""
    os.environ["BIOCLIP_JAX_INDEX_CACHE"] = str(tmp_path_factory.mktemp("index_cache"))
    yield
    os.environ.pop("BIOCLIP_JAX_INDEX_CACHE", None)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache():
    """Programs compiled by one test (the same train step, say) are reused by the next."""
    import jax

    with tempfile.TemporaryDirectory(prefix="bioclip_jax_xla_cache_") as cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        yield


@pytest.fixture(autouse=True)
def _console():
    """The library's messages reach stdout and stderr as on a command's console at its default level
    (a test that ran a command with -q or -v leaves no other level behind), where capsys reads them."""
    console.configure()
