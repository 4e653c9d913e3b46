"""benchmarks/gpu_check.py, the parts a CPU can check: arguments, dry run, skip messages, summary CSV."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_lists_every_step():
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for step in _module().STEPS:
        assert f"[{step}]" in r.stdout


def test_bad_step_is_rejected():
    r = subprocess.run([sys.executable, str(SCRIPT), "--only", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "invalid choice" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU skip path")
def test_no_gpu_skips_with_reason_and_writes_csv(tmp_path):
    assert _module().main(["--only", "determinism", "tests", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["step"] for r in rows] == ["determinism", "tests"]
    assert all(r["status"] == "skipped" and "no CUDA GPU" in r["detail"] for r in rows)


def test_step_budgets_fit_the_gpu_lease():
    mod = _module()
    assert set(mod.BUDGET_S) == set(mod.STEPS)
    assert sum(mod.BUDGET_S.values()) <= mod.TOTAL_BUDGET_S - 120  # room for the start and the log copy
