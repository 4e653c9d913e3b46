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


def test_steps_are_planned_into_calls_that_fit_the_device_limits():
    """One command runs at most 10 minutes and a session has 15 of device time: every call fits
    CALL_S, and the first (the open issue's figures) fits the session with 2 minutes for the start."""
    mod = _module()
    assert set(mod.BUDGET_S) == set(mod.STEPS)
    calls = mod.plan(mod.STEPS)
    assert [s for c in calls for s in c] == mod.STEPS
    assert all(sum(mod.BUDGET_S[s] for s in c) <= mod.CALL_S < 600 for c in calls)
    assert calls[0] == ["precision", "train_step", "graphs", "bench"]
    assert mod.CALL_S + 120 <= mod.DEVICE_S
    assert mod.plan(["tests", "determinism", "memcheck"], call_s=450) == [["tests", "determinism"], ["memcheck"]]


def test_a_call_outside_the_plan_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        _module().main(["--only", "tests", "--call", "2", "--dry-run"])
    assert exc.value.code == 2 and "--call must be 1..1" in capsys.readouterr().err
