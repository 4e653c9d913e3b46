"""Runs the property tests of tests/property_cases.py in a child process: a backend that crashed
the interpreter (a signal, e.g. the SIGFPE of issue 11) fails this test with the child's output
instead of killing the whole test run. The child uses the same hypothesis profile: "ci"
(derandomised) by default; `make fuzz` runs the exploring profile "long" directly."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_properties_in_a_child_process(request):
    profile = request.config.getoption("hypothesis_profile", default=None) or os.environ.get(
        "GACD_FAST_HYPOTHESIS_PROFILE", "ci")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "property_cases.py"),
           f"--hypothesis-profile={profile}"]
    proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=3600)
    tail = (proc.stdout + proc.stderr)[-8000:]
    assert proc.returncode >= 0, f"the child was killed by signal {-proc.returncode}:\n{tail}"
    assert proc.returncode == 0, f"property tests failed:\n{tail}"
