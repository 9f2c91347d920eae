"""A training run whose workdir is gs://, against a real local GCS server: stop, resume, export.

Orbax writes straight to the bucket (its commit protocol needs the real gs:// path), the
resumed run continues exactly where the stopped one ended, and the job binary exports the
finished model from the bucket: open_clip loads it with the weights of the same run done locally.
"""

import os
import subprocess
import sys

import open_clip
import torch
from etils import epath

from bioclip_jax import create_model, export_open_clip
from bioclip_jax.train.metrics import read_metrics
from gcs_server import gcs_bucket, gcs_dir, gcs_env  # noqa: F401 - fixtures
from train_helpers import losses, run, shards  # noqa: F401 - fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE = {"total_steps": 6, "checkpoint__every_steps": 3}


def test_stop_and_resume_in_a_bucket_gives_the_local_losses_and_exports(gcs_dir, shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a gs:// URL taken for a local path would appear here as "gs:"
    local = losses(run(tmp_path / "local", shards, **SCHEDULE))

    workdir = f"{gcs_dir}/run"
    run(workdir, shards, stop_after=3, **SCHEDULE)
    assert sorted(p.name for p in epath.Path(workdir, "checkpoints").iterdir()) == ["1", "3"]
    run(workdir, shards, **SCHEDULE)
    assert losses(read_metrics(workdir)) == local
    assert "6" in {p.name for p in epath.Path(workdir, "checkpoints").iterdir()}
    assert not os.path.exists(tmp_path / "gs:") and not os.path.exists(os.path.join(REPO, "gs:"))

    out = tmp_path / "exported"
    env = {**os.environ, **gcs_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "bioclip_jax.cli.main", "export", "--checkpoint", workdir,
                           "--output", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    export_open_clip(create_model(pretrained=str(tmp_path / "local")), tmp_path / "local_exported")
    exported = open_clip.create_model(f"local-dir:{out}").state_dict()
    reference = open_clip.create_model(f"local-dir:{tmp_path / 'local_exported'}").state_dict()
    assert exported.keys() == reference.keys()
    for key, value in exported.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
