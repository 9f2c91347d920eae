"""A gs:// workdir whose server is down, or takes connections and never answers: one sentence naming
the workdir, its lock or its log, within the storage deadline."""

import os
import socket
import subprocess
import sys
import time

import pytest
from gcs_server import client_env

DEADLINE_S = "4"
CHECK = "from bioclip_jax.train.workdir import check_workdir; check_workdir('gs://bioclip-test/run')"
APPEND = "from bioclip_jax import paths; paths.append_line('gs://bioclip-test/run/metrics.jsonl', '{}', 'train')"
LOCK = "from bioclip_jax.train.workdir import WorkdirLock\nwith WorkdirLock('gs://bioclip-test/run'):\n    pass"


def _run_against(url: str, code: str) -> tuple[str, float]:
    """The last line a Python process running `code` printed with gcsfs pointed at `url`, and its seconds."""
    env = {**os.environ, **client_env(url), "BIOCLIP_JAX_STORAGE_TIMEOUT_S": DEADLINE_S}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, result.stdout
    return result.stderr.strip().splitlines()[-1], time.monotonic() - start


def test_a_bucket_server_that_is_down_names_the_workdir_within_the_storage_deadline():
    """The old code let gcsfs's own "Cannot connect to host ..." through after its half-minute of retries."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once the socket is closed
    last, seconds = _run_against(url, CHECK)
    assert last.startswith("OSError: cannot reach workdir gs://bioclip-test/run ("), last
    assert seconds < 25, "the storage deadline did not bound the wait"


@pytest.mark.parametrize("code, what", [(LOCK, "taking the lock gs://bioclip-test/run/LOCK"),
                                        (APPEND, "writing a line of gs://bioclip-test/run/metrics.jsonl")])
def test_a_bucket_server_that_never_answers_stops_the_call_at_the_deadline(code, what):
    """The old code waited on gcsfs for as long as the server kept the connection open."""
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        last, seconds = _run_against(f"http://127.0.0.1:{silent.getsockname()[1]}", code)
    assert what in last and "did not finish within 4 s" in last, last
    assert seconds < 25
