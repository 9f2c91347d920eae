"""The project's lint rules (pyproject.toml, [tool.ruff]) hold everywhere: the package, tests, benchmarks, configs."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                             "bioclip_jax", "tests", "benchmarks", "configs", "launch"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
