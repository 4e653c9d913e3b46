"""Shared machinery of the benchmark scripts: timing, peak memory, device ceilings, the CSV.

Every script times the same shapes for every provider in one process run and appends rows to one
long-format CSV per run (``benchmarks/results/<script>_<device>_<timestamp>.csv``) with the columns
in :data:`COLUMNS`. A provider that cannot run here is reported as skipped with its reason.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ["op", "provider", "mode", "dtype", "B", "K", "M", "D", "N", "metric", "unit",
           "p50", "p20", "p80", "device", "torch", "triton", "commit", "timestamp", "load"]
MODES = ("fwd", "bwd", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


def device_name(device: torch.device) -> str:
    """The GPU's name; for a CPU its cores, threads, vector capability and whether it has bf16
    instructions (without them bf16 runs emulated, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from gacd_fast import _precision

    bf16 = "bf16 native" if _precision.is_native("bf16", device) else "bf16 emulated"
    return (f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads, "
            f"{torch.backends.cpu.get_cpu_capability()}, {bf16})")


def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:
        return ""


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, reps: int) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn``: CUDA events on a GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return quantiles(times)


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int, reps: int,
                     few: frozenset[str] = frozenset()) -> dict[str, tuple[float, float, float]]:
    """(p50, p20, p80) ms of each function, timed round-robin (one call of each per round), so
    that a change of the machine's load between rounds hits every function alike: on a shared
    machine the ratios hold up better than with one function's repeats after another's. The
    functions in ``few`` (e.g. emulated precisions, minutes a call) get no warm-up and one round."""
    for name, fn in fns.items():
        for _ in range(0 if name in few else warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        for name, fn in fns.items():
            if name in few and r > 0:
                continue
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: quantiles(ts) for name, ts in times.items()}


def quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def cpu_peak_extra_mb(fn: Callable[[], object], warmup: bool = True) -> float:
    """Peak RSS growth while ``fn`` runs, in MB (Linux: VmHWM after resetting it to VmRSS).
    ``warmup``: measure the second call (the first makes lazy inits, compiled code, allocator
    pools); False: the first (whole training steps, too slow to run twice)."""
    if warmup:
        fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current RSS
    base = _rss_kb("VmRSS")
    fn()
    return max(0, _rss_kb("VmHWM") - base) / 1024


def probe_in_subprocess(script: Path, spec: dict) -> float:
    """Run ``script --probe SPEC`` in a fresh process; it prints the peak extra MB of one call.

    A fixed mmap threshold makes glibc return every large block at free, so the peak of the
    measured call is not hidden by memory the warm-up call left in the heap.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script), "--probe", json.dumps(spec)], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.strip().splitlines()[-1])


def cuda_peak_extra_mb(fn: Callable[[], object], device: torch.device, warmup: bool = True) -> float:
    if warmup:
        fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def device_ceilings(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """The device's own ceilings, measured now: copy bandwidth (GB/s) and matmul TFLOP/s."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # bytes of float32 copied
    src = torch.empty(n // 4, device=device)
    dst = torch.empty_like(src)
    t, _, _ = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    bandwidth = 2 * n / (t * 1e-3) / 1e9  # one read, one write
    m = 8192 if device.type == "cuda" else 1024
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    t, _, _ = time_ms(lambda: a @ b, device, warmup=3, reps=10)
    return {"copy_GBps": bandwidth, "matmul_TFLOPs": 2 * m**3 / (t * 1e-3) / 1e12}


@dataclass
class Recorder:
    """Collects result rows and skipped providers; writes the CSV and prints a summary."""

    script: str
    device: torch.device
    rows: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.meta = {
            "device": device_name(self.device), "torch": torch.__version__, "triton": triton_version(),
            "commit": git_commit(), "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def add(self, op: str, provider: str, mode: str, dtype: str, shape: dict, metric: str, unit: str,
            p50: float, p20: float | None = None, p80: float | None = None) -> None:
        row = {c: "" for c in COLUMNS}
        row.update(op=op, provider=provider, mode=mode, dtype=dtype, metric=metric, unit=unit,
                   p50=f"{p50:.6g}", p20=f"{(p50 if p20 is None else p20):.6g}",
                   p80=f"{(p50 if p80 is None else p80):.6g}", load=f"{os.getloadavg()[0]:.2f}", **self.meta)
        row.update({k: str(v) for k, v in shape.items()})
        self.rows.append(row)

    def skip(self, provider: str, reason: str) -> None:
        if provider not in self.skipped:
            self.skipped[provider] = reason
            print(f"  [skipped] {provider}: {reason}", flush=True)

    def write(self, out_dir: Path = RESULTS) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.meta["timestamp"].replace(":", "").replace("-", "")[:15]
        path = out_dir / f"{self.script}_{self.device.type}_{stamp}.csv"
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(self.rows)
        if self.skipped:
            path.with_suffix(".skipped.json").write_text(json.dumps(self.skipped, indent=1) + "\n")
        print(f"wrote {path} ({len(self.rows)} rows)")
        return path

    def summary(self, baselines: Iterable[str] = ("torch_eager", "torch_compile"),
                only: Callable[[dict], bool] = lambda row: True) -> str:
        """Time and memory of each provider with its ratio to each baseline (baseline / provider),
        over the rows ``only`` keeps."""
        return summarize([r for r in self.rows if only(r)], baselines)


def summarize(rows: list[dict], baselines: Iterable[str] = ("torch_eager", "torch_compile")) -> str:
    baselines = list(baselines)
    key = lambda r: (r["op"], r["mode"], r["dtype"], r["B"], r["K"], r["M"], r["D"], r["N"], r["metric"])  # noqa: E731
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["metric"] in ("time", "peak_memory"):
            groups.setdefault(key(r), {})[r["provider"]] = float(r["p50"])
    lines = [f"{'op':<14}{'mode':<5}{'dtype':<9}{'shape':<34}{'metric':<12}{'provider':<15}{'p50':>11}"
             + "".join(f"{'x ' + b:>17}" for b in baselines)]
    for k, provs in groups.items():
        op, mode, dtype, B, K, M, D, N, metric = k
        shape = " ".join(f"{n}={v}" for n, v in zip("BKMDN", (B, K, M, D, N)) if v)
        unit = "ms" if metric == "time" else "MB"
        for prov, v in sorted(provs.items(), key=lambda kv: kv[1]):
            ratios = ""
            for b in baselines:
                base = provs.get(b)
                ratios += f"{(base / v if base is not None and v > 0 else float('nan')):>17.2f}"
            lines.append(f"{op:<14}{mode:<5}{dtype:<9}{shape:<34}{metric:<12}{prov:<15}{v:>9.3f}{unit:>2}" + ratios)
    return "\n".join(lines)


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to run on (default: cuda when present, else cpu)")
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats, so a CPU run takes minutes")
    p.add_argument("--dtypes", default="float32,bfloat16" if torch.cuda.is_available() else "float32",
                   help="comma-separated: float32,bfloat16,float16 (default: float32,bfloat16 on a GPU, float32 on a CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed repeats per point (default: 30 GPU, 5 CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV (default benchmarks/results)")
    return p


def peak_extra_mb(fn: Callable[[], object], device: torch.device, warmup: bool = True) -> float:
    return cuda_peak_extra_mb(fn, device, warmup) if device.type == "cuda" else cpu_peak_extra_mb(fn, warmup)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
