"""The package installs with kernels/ as gacd_fast.kernels, and runs from a bare checkout too."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_maps_kernels_into_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, cwd=tmp_path, env={**os.environ, "GACD_FAST_BUILD_EXT": "0"},
    )
    (wheel,) = tmp_path.glob("gacd_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "gacd_fast/kernels/__init__.py" in names
    assert "gacd_fast/ops/reference.py" in names
    assert not any(n.startswith("kernels/") for n in names)


@pytest.mark.slow
def test_runs_from_source_tree_without_install(tmp_path):
    # Hide any installed copy (an editable install's finder) so only PYTHONPATH can supply it.
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import gacd_fast, gacd_fast.kernels, torch\n"
        "assert gacd_fast.__file__.startswith(sys.argv[1]), gacd_fast.__file__\n"
        "assert gacd_fast.kernels.__file__.startswith(sys.argv[1]), gacd_fast.kernels.__file__\n"
        "q = torch.randn(3, 4); print(float(gacd_fast.info_nce(q, q, q)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
