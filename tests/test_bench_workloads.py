"""benchmarks/workloads.py and the whole-step benchmarks that use it: choosing variants, the
summary's ratios and target verdicts, and one tiny run of bench_pgd that writes its CSV."""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workloads():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import workloads
        yield workloads
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_variants_are_chosen_by_label_in_the_benchmarks_order(workloads):
    chosen = workloads.chosen_variants("gacd_cl fp32, plain fp32")
    assert [v.label for v in chosen] == ["plain fp32", "gacd_cl fp32"]
    assert [(v.base, v.channels_last) for v in chosen] == [("plain", False), ("gacd", True)]
    for bad in ("plain", "gacd fp64", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="choose from"):
            workloads.chosen_variants(bad)


def _row(provider, dtype, metric, p50):
    return dict(op="pgd10_resnet18", provider=provider, dtype=dtype, metric=metric, p50=p50, B=32, K="")


def test_summary_gives_ratios_and_verdicts(workloads):
    rows = [_row("torchattacks", "float32", "time", 3000), _row("gacd", "float32", "time", 2900),
            _row("gacd", "bfloat16", "time", 1600), _row("gacd", "bfloat16", "peak_memory", 100),
            _row("plain", "float32", "peak_memory", 90)]
    targets = {"pgd10_resnet18": [("speedup", "gacd bf16", "torchattacks fp32", 2.0),
                                  ("time_ratio", "gacd fp32", "torchattacks fp32", 1.0),
                                  ("memory_ratio", "gacd bf16", "plain fp32", 1.0),
                                  ("speedup", "gacd_cl fp32", "torchattacks fp32", 1.0)]}
    text = workloads.summary(rows, targets)
    assert "target: gacd bf16 is 1.88x torchattacks fp32 (needs >= 2.0): NOT MET" in text
    assert "target: gacd fp32 / torchattacks fp32 time = 0.97 (needs <= 1.0): MET" in text
    assert "target: gacd bf16 / plain fp32 peak memory = 1.11 (needs <= 1.0): NOT MET" in text
    assert "target speedup gacd_cl fp32 vs torchattacks fp32: not measured" in text


def test_bench_pgd_runs_the_chosen_variants_and_writes_a_csv(tmp_path):
    cmd = [sys.executable, "benchmarks/bench_pgd.py", "--quick", "--no-steps", "--no-memory", "--reps", "1",
           "--workloads", "small_cnn_digits", "--variants", "plain fp32,gacd_cl fp32", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    [path] = tmp_path.glob("bench_pgd_*.csv")
    rows = list(csv.DictReader(path.open()))
    assert {(row["provider"], row["metric"]) for row in rows} == {
        (p, m) for p in ("plain", "gacd_cl") for m in ("time", "images_per_s")}
    assert "gacd_cl fp32" in r.stdout and "x plain fp32" in r.stdout
