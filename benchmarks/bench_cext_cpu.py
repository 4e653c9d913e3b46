"""CPU benchmark of the C++ extension's InfoNCE against the PyTorch paths, forward + backward.

Providers, all on the same inputs in one run:
  gacd_cext      the C++ extension (backend "cext"): chunked BLAS + online log-sum-exp
  torch_eager    gacd_fast.ops.reference.info_nce_rows: the formula, B x K logits materialised
  torch_compile  torch.compile (inductor) of that reference
  gacd_torch     the torch backend's chunked path (gacd_fast.ops.chunked.info_nce_rows)

Shape: B=256 queries, D=128, a shared bank of K=65,536 rows that needs no gradient (the GACD memory
bank); query and positive need gradients. One step = rows.sum().backward(), float32.

Time: median (p20, p80) of --reps timed steps after a warm-up, all providers in this process.
Memory: the extra peak resident memory of one step, measured in a fresh process per provider
(benchmarks/common.py: after a warm-up step, VmHWM is reset to the current RSS through
/proc/self/clear_refs, one step runs, and VmHWM - RSS is the extra peak). The probe process sets
MALLOC_MMAP_THRESHOLD_ so glibc maps every large block and returns it at free: RSS then follows the
live tensors and the warm-up's freed heap cannot hide the step's peak. Inputs, weights of the
process and compiled code are in the baseline, so the figure is what one step adds.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_cext_cpu.py [--reps 7] [--K 65536] [--threads 1]

Writes benchmarks/results/bench_cext_cpu_cpu_<timestamp>.csv (long format, common.COLUMNS).
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import COLUMNS, cpu_peak_extra_mb, device_name, time_ms, triton_version  # noqa: E402

from gacd_fast.ops import cext_backend, chunked, reference  # noqa: E402

PROVIDERS = ["gacd_cext", "torch_eager", "torch_compile", "gacd_torch"]
TAU = 0.07


def make_step(provider: str, B: int, K: int, D: int):
    """Inputs and a closure running one forward + backward of ``provider``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=g).requires_grad_()
    p = torch.randn(B, D, generator=g).requires_grad_()
    n = torch.randn(K, D, generator=g)
    if provider == "gacd_cext":
        cext_backend.load()
        fn = cext_backend.info_nce_rows
    elif provider == "torch_eager":
        fn = reference.info_nce_rows
    elif provider == "torch_compile":
        fn = torch.compile(reference.info_nce_rows)
    elif provider == "gacd_torch":
        fn = chunked.info_nce_rows
    else:
        raise ValueError(provider)

    def step():
        q.grad = p.grad = None
        fn(q, p, n, None, TAU, True).sum().backward()

    return step


def git_commit() -> str:
    """HEAD's commit read from .git (no git process)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            path = ROOT / ".git" / ref
            if path.exists():
                return path.read_text().strip()[:12]
            for line in (ROOT / ".git" / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0][:12]
            return ""
        return head[:12]
    except OSError:
        return ""


def probe(provider: str, B: int, K: int, D: int) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(torch.get_num_threads()),
         "--probe", json.dumps(dict(provider=provider, B=B, K=K, D=D))],
        env=env, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory probe of {provider} failed: {out.stderr.strip()[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=256)
    ap.add_argument("--K", type=int, default=65536)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:  # child process: print the extra peak MB of one step
        spec = json.loads(args.probe)
        print(cpu_peak_extra_mb(make_step(spec["provider"], spec["B"], spec["K"], spec["D"])))
        return

    B, K, D = args.B, args.K, args.D
    cext_backend.load()  # build (announced) before anything is timed
    dev = torch.device("cpu")
    meta = dict(device=device_name(dev), torch=torch.__version__, triton=triton_version(), commit=git_commit(),
                timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    rows, summary = [], {}
    for prov in PROVIDERS:
        print(f"{prov}: timing ...", file=sys.stderr, flush=True)
        t50, t20, t80 = time_ms(make_step(prov, B, K, D), dev, warmup=2, reps=args.reps)
        print(f"{prov}: memory probe ...", file=sys.stderr, flush=True)
        mem = probe(prov, B, K, D)
        summary[prov] = (t50, mem)
        for metric, unit, vals in (("time", "ms", (t50, t20, t80)), ("peak_memory", "MB", (mem, mem, mem))):
            row = dict.fromkeys(COLUMNS, "")
            # N (a shape field in the other scripts) is unused here; repeats: --reps timed steps
            row.update(op="info_nce", provider=prov, mode="full", dtype="float32", B=B, K=K, M="", D=D, N="",
                       metric=metric, unit=unit,
                       p50=f"{vals[0]:.6g}", p20=f"{vals[1]:.6g}", p80=f"{vals[2]:.6g}", **meta)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = meta["timestamp"].replace(":", "").replace("-", "")[:15]
    path = args.out / f"bench_cext_cpu_cpu_{stamp}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    base_t, base_m = summary["torch_eager"]
    comp_t = summary["torch_compile"][0]
    print(f"info_nce fwd+bwd float32 B={B} K={K} D={D} on {meta['device']}, torch {meta['torch']}")
    print(f"{'provider':<15}{'p50 ms':>10}{'x eager':>9}{'x compile':>11}{'extra MB':>10}{'eager/MB':>10}")
    for prov, (t, m) in summary.items():
        print(f"{prov:<15}{t:>10.1f}{base_t / t:>9.2f}{comp_t / t:>11.2f}{m:>10.1f}"
              f"{(base_m / m if m > 0 else float('inf')):>10.1f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
