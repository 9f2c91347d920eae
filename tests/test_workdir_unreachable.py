"""A gs:// workdir whose server does not answer at start-up: one sentence naming the workdir."""

import json
import os
import socket
import subprocess
import sys
import time

CHECK = "from bioclip_jax.train.workdir import check_workdir; check_workdir('gs://bioclip-test/run')"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket is closed


def test_a_bucket_server_that_is_down_names_the_workdir_within_the_storage_deadline():
    """The old code let gcsfs's own "Cannot connect to host ..." through after its half-minute of retries."""
    url = f"http://127.0.0.1:{_closed_port()}"
    env = dict(os.environ, STORAGE_EMULATOR_HOST=url, FSSPEC_GCS=json.dumps({"token": "anon"}),
               GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false", EPATH_USE_TF="false", NO_GCE_CHECK="true",
               BIOCLIP_JAX_STORAGE_TIMEOUT_S="4")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: cannot reach workdir gs://bioclip-test/run ("), result.stderr
    assert time.monotonic() - start < 25, "the storage deadline (4 s) did not bound the wait"
