"""The committed kernel resource report (benchmarks/results/kernel_resources.csv, `make kernel-report`):
it covers every Triton kernel and the CUDA extension for sm_80 and sm_90, and no sm_90 row spills.
Plus a small live compile (in a subprocess without the interpreter, a few seconds) so the report
script itself stays working."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "kernel_resources.csv"
KERNELS = ["info_nce._info_nce_fwd_bank_kernel", "info_nce._info_nce_fwd_gather_kernel",
           "info_nce._info_nce_fwd_combine_kernel", "info_nce._info_nce_bwd_dq_bank_kernel",
           "info_nce._info_nce_bwd_dq_gather_kernel", "info_nce._info_nce_bwd_dn_bank_kernel",
           "info_nce._info_nce_bwd_dn_segment_kernel", "_common._row_inv_norm_kernel",
           "l2_normalize._l2_normalize_fwd_kernel", "l2_normalize._l2_normalize_bwd_kernel",
           "cosine_similarity._cosine_similarity_fwd_kernel", "cosine_similarity._cosine_similarity_bwd_kernel",
           "pgd_step._pgd_step_linf_kernel", "pgd_step._pgd_step_l2_partial_kernel",
           "pgd_step._pgd_step_l2_apply_kernel", "pgd_random_start._pgd_random_start_linf_kernel"]


def _rows():
    return list(csv.DictReader(CSV.open()))


def test_report_covers_every_kernel_and_arch():
    rows = _rows()
    have = {(r["kernel"], r["arch"]) for r in rows if r["source"] == "triton"}
    for k in KERNELS:
        for arch in ("sm_80", "sm_90"):
            assert (k, arch) in have, f"{k} {arch} missing from {CSV.name}"
    assert not [r for r in rows if "ERROR" in r["config"]]


def test_no_sm90_row_spills():
    bad = [(r["kernel"], r["dtype"], r["config"], r["spill_bytes"]) for r in _rows()
           if r["arch"] == "sm_90" and int(r["spill_bytes"] or 0) > 0]
    assert not bad, f"{len(bad)} spilling sm_90 rows, first: {bad[:5]}"


def test_report_has_cuda_extension_rows():
    rows = [r for r in _rows() if r["source"] == "nvcc"]
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert {r["kernel"].split(":")[0] for r in rows} == {"csrc/cosine_similarity.cu", "csrc/info_nce.cu",
                                                                 "csrc/l2_normalize.cu", "csrc/pgd_step.cu"}
    assert all(r["regs"] for r in rows)


@pytest.mark.slow
def test_live_compile_does_not_spill(tmp_path):
    """The similarity kernel with the most live values (two inputs, two outputs), at every width
    bucket, compiled now for sm_90: the report script works and the committed tiles still fit."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "r.csv"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_report.py"), "--only", "_cosine_similarity_bwd_kernel",
                        "--dtype", "bf16", "--arch", "90", "--no-cuda-ext", "--jobs", "2", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(row["arch"] == "sm_90" and row["regs"] for row in rows), r.stdout + r.stderr
    assert all(int(row["spill_bytes"]) == 0 and int(row["regs"]) <= 128 for row in rows), rows
