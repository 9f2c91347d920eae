"""Without pybioclip installed, only the tests of test_predict.py that compare with it are skipped."""

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
WITHOUT_PYBIOCLIP = """
import sys
import pytest
sys.modules["bioclip"] = None  # `import bioclip.predict` now fails as if pybioclip were not installed
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_only_the_comparisons_with_pybioclip_skip_without_it(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYBIOCLIP, "-q", "-n", "0", "-p", "no:cacheprovider", "-rs",
         "--rootdir", os.path.dirname(TESTS), os.path.join(TESTS, "test_predict.py"),
         "-k", "sixteen_bit_png or templates_are_pybioclips"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed, 1 skipped" in done.stdout, done.stdout[-3000:]
    assert "could not import 'bioclip.predict'" in done.stdout
