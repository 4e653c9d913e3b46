"""What "auto"'s first-use self-check costs: once per (op, device, dtype), then nothing.

    python benchmarks/bench_self_check.py            # CPU: needs the C++ extension (built here if it can be)

In one run, interleaved in rounds so that load on the machine hits every variant alike:
- ``first_call``: the first "auto" resolution of each op on a fresh process's state, which runs the
  check (ms);
- ``resolve``: one "auto" resolution after that, three ways: ``auto_checked`` (the verdict cached),
  ``auto_check_off`` (GACD_FAST_SELF_CHECK=0) and ``auto_without_check`` (the registry's choice
  with the check machinery removed, i.e. before it existed) (us);
- ``call``: a whole small op call through "auto" (info_nce B=64 K=1024 D=128 fwd, l2_normalize
  256 x 128) with and without the check machinery (us);
- ``lookup``: the cached verdict's look-up alone, against an empty Python call (us).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gacd_fast  # noqa: E402
from common import Recorder, base_parser, sync  # noqa: E402
from gacd_fast import backends  # noqa: E402

OPS = ("info_nce_rows", "l2_normalize", "cosine_similarity", "pgd_step_", "pgd_random_start")


def per_call_us(fn, device: torch.device, n: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=60, help="interleaved rounds of every variant (median reported)")
    args = p.parse_args()
    device = torch.device(args.device)
    compiled = "triton" if device.type == "cuda" else "cext"
    if compiled == "cext":
        from gacd_fast.ops import cext_backend

        cext_backend.load()  # builds it when it is not built yet (about a minute)
    rec = Recorder("bench_self_check", device)
    dtype = torch.float32
    original = backends._usable_by_auto

    # first calls: the check itself, once per op (a fresh verdict table each round)
    firsts: dict[str, list[float]] = {op: [] for op in OPS}
    for _ in range(max(3, args.rounds // 3)):
        backends._verdicts.clear()
        backends._seen.clear()
        for op in OPS:
            t0 = time.perf_counter()
            name, _ = backends.resolve(op, device, None, dtype)
            sync(device)
            firsts[op].append((time.perf_counter() - t0) * 1e3)
            assert name == compiled, f"auto chose {name} for {op}"
    for op, ts in firsts.items():
        rec.add(op, "auto_checked", "first_call", "float32", {}, "time", "ms", statistics.median(ts), min(ts), max(ts))

    g = torch.Generator().manual_seed(0)
    q, pos, n = (torch.randn(s, generator=g).to(device) for s in ((64, 128), (64, 128), (1024, 128)))
    x = torch.randn(256, 128, generator=g).to(device)
    calls = {"info_nce_rows": lambda: gacd_fast.info_nce(q, pos, n), "l2_normalize": lambda: gacd_fast.l2_normalize(x)}
    variants = {
        "auto_checked": lambda: (backends.set_self_check(True), setattr(backends, "_usable_by_auto", original)),
        "auto_check_off": lambda: (backends.set_self_check(False), setattr(backends, "_usable_by_auto", original)),
        "auto_without_check": lambda: setattr(backends, "_usable_by_auto", lambda *a: True),
    }
    resolve_t: dict[tuple[str, str], list[float]] = {}
    call_t: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for vname, setup in variants.items():
            setup()
            for op in ("info_nce_rows", "l2_normalize"):
                backends.resolve(op, device, None, dtype)  # the verdict is cached (or the path has none)
                resolve_t.setdefault((op, vname), []).append(
                    per_call_us(lambda op=op: backends.resolve(op, device, None, dtype), device, 500))
                if vname != "auto_check_off":
                    call_t.setdefault((op, vname), []).append(per_call_us(calls[op], device, 10))
    backends.set_self_check(True)
    backends._usable_by_auto = original
    # the look-up itself, once the verdict is cached: what the check adds to every later "auto" call
    lookup = {"verdict_lookup": lambda: original("info_nce_rows", compiled, device, dtype),
              "empty_call": lambda: None}
    lookup_t: dict[str, list[float]] = {k: [] for k in lookup}
    for _ in range(args.rounds):
        for k, fn in lookup.items():
            lookup_t[k].append(per_call_us(fn, torch.device("cpu"), 20000))
    for k, ts in lookup_t.items():
        rec.add("info_nce_rows", k, "lookup", "float32", {}, "time", "us", statistics.median(ts),
                *statistics.quantiles(ts, n=10)[1::6])
    for (op, vname), ts in resolve_t.items():
        rec.add(op, vname, "resolve", "float32", {}, "time", "us", statistics.median(ts),
                *statistics.quantiles(ts, n=10)[1::6])
    for (op, vname), ts in call_t.items():
        shape = {"B": 64, "K": 1024, "D": 128} if op == "info_nce_rows" else {"N": 256, "D": 128}
        rec.add(op, vname, "call", "float32", shape, "time", "us", statistics.median(ts),
                *statistics.quantiles(ts, n=10)[1::6])
    rec.write()
    print(f"{'op':<18}{'mode':<11}{'variant':<20}{'p50':>10}")
    for r in rec.rows:
        print(f"{r['op']:<18}{r['mode']:<11}{r['provider']:<20}{float(r['p50']):>10.3f} {r['unit']}")
    print(f"verdict look-up {statistics.median(lookup_t['verdict_lookup']):.3f} us, an empty Python call "
          f"{statistics.median(lookup_t['empty_call']):.3f} us")
    for op in ("info_nce_rows", "l2_normalize"):
        a = statistics.median(resolve_t[(op, "auto_checked")])
        b = statistics.median(resolve_t[(op, "auto_without_check")])
        c = statistics.median(call_t[(op, "auto_checked")])
        d = statistics.median(call_t[(op, "auto_without_check")])
        print(f"{op}: resolve {a:.2f} us checked vs {b:.2f} us without ({a - b:+.2f} us); "
              f"whole call {c:.1f} vs {d:.1f} us ({100 * (c - d) / d:+.1f}%)")


if __name__ == "__main__":
    main()
