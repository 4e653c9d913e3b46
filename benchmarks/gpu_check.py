"""Every owed GPU check, planned for the lent H200: a session has 15 minutes of device time in all
(the machine's start counts) and one command runs at most 10 minutes, so the steps are packed, in
the order below (the open issue's figures first), into calls of at most 540 s each (the budgets
below: each a hard limit on its whole step). One invocation runs one call (``--call N``, default 1)
and prints the plan with the command for every call; on a machine without a GPU it says what it
skips and why. Uses the current python (no pip, no .venv rebuild):

    PYTHONPATH=. python3 benchmarks/gpu_check.py [--call N] [--only STEP ...] [--skip STEP ...] [--out DIR] [--dry-run]
    make gpu-check PY=python3            # call 1; then: PYTHONPATH=. python3 benchmarks/gpu_check.py --call 2

Steps (each writes a log to benchmarks/results/gpu_check_<stamp>/ and one row of summary.csv):
  precision    the mixed-precision tests on the GPU: bf16/fp16 attacks, GACDLoss with half
               features and a bf16 bank, bf16/fp16 info_nce on every backend (issue 20)
  train_step   benchmarks/bench_train_step.py on ResNet-18 (B=128, K=16,384, PGD-10): plain loop,
               torchattacks, gacd_fast fp32 and bf16, each also in channels_last, side by side (issue 20)
  graphs       benchmarks/bench_cuda_graphs.py: PGD-10 with one step as a CUDA graph and under
               torch.compile(mode="reduce-overhead"), fp32 and bf16, vs eager (issue 20)
  bench        benchmarks/run_all.py (all shapes, every provider; missing peers are listed as skipped)
  tests        the test suite without the interpreter (TRITON_INTERPRET=0: compiled kernels on CUDA)
  determinism  10 runs of info_nce fwd+bwd (bank and neg_index, bf16 and fp32): bitwise equal
  memcheck     compute-sanitizer --tool memcheck on the Triton and CUDA info_nce / pgd kernels
  cext         the C++/CUDA extension built against the CUDA torch (JIT, TORCH_EXTENSIONS_DIR) + tests
"""
from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["precision", "train_step", "graphs", "bench", "tests", "determinism", "memcheck", "cext"]
# seconds per step, for all its commands together: estimates (no GPU has run graphs, precision and
# the channels_last variants of train_step yet)
BUDGET_S = {"precision": 60, "train_step": 90, "graphs": 150, "bench": 240, "tests": 360, "determinism": 90,
            "memcheck": 180, "cext": 210}
CALL_S = 540  # one device command runs at most 600 s: a minute for python's start and the logs
DEVICE_S = 15 * 60  # a session's device time in all, the machine's start (1-2 min) included


def plan(steps: list[str], call_s: int = CALL_S) -> list[list[str]]:
    """``steps`` in their order, packed into calls whose budgets sum to at most ``call_s``."""
    calls: list[list[str]] = []
    for s in steps:
        if calls and sum(BUDGET_S[t] for t in calls[-1]) + BUDGET_S[s] <= call_s:
            calls[-1].append(s)
        else:
            calls.append([s])
    return calls

DETERMINISM = r"""
import torch, gacd_fast
torch.manual_seed(0)
for dt in (torch.float32, torch.bfloat16):
    for M in (None, 64):
        q = torch.randn(256, 128, device="cuda", dtype=dt); p = torch.randn_like(q)
        n = torch.randn(65536, 128, device="cuda", dtype=dt)
        idx = None if M is None else torch.randint(0, 65536, (256, M), device="cuda")
        ref = None
        for i in range(10):
            ts = [t.clone().requires_grad_() for t in (q, p, n)]
            loss = gacd_fast.info_nce(*ts, neg_index=idx, backend="triton")
            loss.backward()
            out = [loss.detach()] + [t.grad for t in ts]
            if ref is None:
                ref = out
            else:
                assert all(torch.equal(a, b) for a, b in zip(ref, out)), f"run {i} differs: {dt} M={M}"
        print("deterministic:", dt, M)
"""

MEMCHECK = r"""
import torch, gacd_fast
q = torch.randn(37, 200, device="cuda", requires_grad=True); p = torch.randn(37, 200, device="cuda")
n = torch.randn(1000, 200, device="cuda", requires_grad=True)
idx = torch.randint(0, 1000, (37, 17), device="cuda")
for be in ("triton", "cext"):
    for i in (None, idx):
        gacd_fast.info_nce(q, p, n, neg_index=i, backend=be).backward()
        gacd_fast.info_nce(q, p, n.detach(), neg_index=i, backend=be).backward()
    x = torch.rand(4, 3, 32, 32, device="cuda"); g = torch.randn_like(x)
    gacd_fast.pgd_step_(x.clone(), g, x, alpha=0.01, eps=0.03, backend=be)
    gacd_fast.pgd_step_(x.clone(), g, x, alpha=0.01, eps=0.5, norm="l2", backend=be)
torch.cuda.synchronize(); print("memcheck workload done")
"""


def commands(step: str, py: str) -> list[list[str]]:
    """The command lines of ``step`` (run from the repository root)."""
    if step == "tests":
        return [[py, "-m", "pytest", "-q", "-x", "tests", "-p", "no:cacheprovider"]]
    if step == "memcheck":
        return [["compute-sanitizer", "--tool", "memcheck", "--error-exitcode", "3", py, "-c", MEMCHECK]]
    if step == "determinism":
        return [[py, "-c", DETERMINISM]]
    if step == "bench":
        return [[py, "benchmarks/run_all.py", "--skip", "bench_train_step.py"]]
    if step == "cext":
        return [[py, "-c", "import gacd_fast.ops.cext_backend as C, torch; print(C.unavailable_reason(torch.device('cuda')))"],
                [py, "-m", "pytest", "-q", "tests/test_cext.py", "tests/test_cext_nvcc.py"]]
    if step == "train_step":
        return [[py, "benchmarks/bench_train_step.py", "--workloads", "resnet18"]]
    if step == "graphs":
        return [[py, "benchmarks/bench_cuda_graphs.py", "--quick"]]
    if step == "precision":
        return [[py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_precision.py", "-p", "no:cacheprovider"]]
    raise ValueError(f"unknown step {step!r}; steps: {', '.join(STEPS)}")


def skip_reason(step: str, py: str) -> str | None:
    """Why ``step`` cannot run here (None: it can)."""
    probe = subprocess.run([py, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True, text=True)
    if probe.stdout.strip() != "True":
        return "no CUDA GPU visible to torch (" + (probe.stderr.strip().splitlines() or ["cpu build"])[-1][:100] + ")"
    if step == "memcheck" and shutil.which("compute-sanitizer") is None:
        return "compute-sanitizer not on PATH"
    if step == "cext" and shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "no nvcc / CUDA_HOME for the extension build"
    return None


def write_summary(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "status", "seconds", "detail", "log"])
        w.writeheader()
        w.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--call", type=int, default=1, help="which call of the plan to run (default 1)")
    ap.add_argument("--only", nargs="+", choices=STEPS, default=None)
    ap.add_argument("--skip", nargs="+", choices=STEPS, default=[])
    ap.add_argument("--out", default=None, help="folder for logs and summary.csv")
    ap.add_argument("--py", default=sys.executable, help="python to run the steps with")
    ap.add_argument("--dry-run", action="store_true", help="print every call's commands, run nothing")
    args = ap.parse_args(argv)
    calls = plan([s for s in (args.only or STEPS) if s not in args.skip])
    if not 1 <= args.call <= len(calls):
        ap.error(f"--call must be 1..{len(calls)}: the plan has {len(calls)} call(s)")
    for i, c in enumerate(calls, 1):
        print(f"call {i} ({sum(BUDGET_S[s] for s in c)} s): {' '.join(c)}"
              + ("  <- this one" if i == args.call else f"  (--call {i}, with the same --only/--skip)"))
    steps = calls[args.call - 1]
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu_check_{time.strftime('%Y%m%dT%H%M%S')}")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / "build" / "torch_extensions")))
    if args.dry_run:  # every call's commands
        for i, c in enumerate(calls, 1):
            for s in c:
                for cmd in commands(s, args.py):
                    print(f"call {i} [{s}] {' '.join(cmd)[:200]}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in steps:
        reason = skip_reason(s, args.py)
        log = out / f"{s}.log"
        if reason:
            print(f"[{s}] SKIPPED: {reason}")
            rows.append(dict(step=s, status="skipped", seconds=0, detail=reason, log=""))
            write_summary(out / "summary.csv", rows)
            continue
        t0, status, detail = time.time(), "pass", ""
        with log.open("w") as f:
            for c in commands(s, args.py):
                f.write(f"$ {' '.join(c)[:300]}\n")
                f.flush()
                try:
                    left = BUDGET_S[s] - (time.time() - t0)  # the step's budget covers all its commands
                    r = subprocess.run(c, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=max(1.0, left))
                    if r.returncode != 0:
                        status, detail = "fail", f"exit {r.returncode}"
                        break
                except subprocess.TimeoutExpired:
                    status, detail = "fail", f"timeout after {BUDGET_S[s]} s"
                    break
        rows.append(dict(step=s, status=status, seconds=round(time.time() - t0, 1), detail=detail, log=str(log)))
        write_summary(out / "summary.csv", rows)
        print(f"[{s}] {status.upper()} in {rows[-1]['seconds']} s {detail} (log {log})", flush=True)
    print(f"summary: {out / 'summary.csv'}")
    return 1 if any(r["status"] == "fail" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
