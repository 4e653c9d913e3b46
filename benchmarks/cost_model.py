"""A GPU cost MODEL (not a measurement): FLOPs and bytes per call of each op at the benchmark shapes
and the lower-bound time at H100 SXM peak rates, max(FLOPs / peak, bytes / bandwidth); it says
whether an op is compute- or memory-bound, so a GPU run can be read against it.

    python benchmarks/cost_model.py [--out benchmarks/results/cost_model_h100.csv]

Peaks (H100 SXM, dense): bf16/fp16 tensor cores 989 TFLOP/s, TF32 495, fp32 FMA (no tensor cores,
the "ieee" path) 67; HBM3 3.35 TB/s. Counted: the kernels' own traffic (bank read once per kernel
that streams it, B x D rows, fp32 partials) and 2 FLOPs per multiply-add of the dots; exp2 and
elementwise work are not counted (they hide under the dots at these shapes).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

PEAK_FLOPS = {"bf16": 989e12, "fp16": 989e12, "tf32": 495e12, "fp32": 67e12}
HBM_BYTES_PER_S = 3.35e12
ITEM = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}
BANK_SHAPES = [(256, 65536, 128), (1024, 65536, 128), (256, 1048576, 128), (256, 65536, 256)]
GATHER_SHAPES = [(256, 4096, 128)]  # B, M, D (CRD-style sampled negatives)


def rows() -> list[dict]:
    out = []

    def add(op, shape, dt, flops, nbytes):
        t_c, t_m = flops / PEAK_FLOPS[dt], nbytes / HBM_BYTES_PER_S
        out.append(dict(op=op, shape=shape, dtype=dt, gflop=round(flops / 1e9, 3), mbytes=round(nbytes / 1e6, 3),
                        intensity_flop_per_byte=round(flops / max(nbytes, 1), 1),
                        lower_bound_us=round(max(t_c, t_m) * 1e6, 2),
                        bound="compute" if t_c > t_m else "memory"))

    for B, K, D in BANK_SHAPES:
        shape = f"B={B} K={K} D={D}"
        for dt in ("bf16", "tf32", "fp32"):
            e = ITEM[dt]
            bank, rowsz = K * D * e, B * D * e
            # frozen bank (GACDLoss memory): forward = scores + P@bank (dq in forward), backward scales
            add("info_nce fwd (frozen bank, dq in fwd)", shape, dt, 4 * B * K * D, bank + 3 * rowsz + 4 * K + 8 * B * D)
            add("info_nce fwd (bank needs grad)", shape, dt, 2 * B * K * D, bank + 2 * rowsz + 4 * K)
            add("info_nce bwd dq (recompute)", shape, dt, 4 * B * K * D, bank + rowsz + 4 * B * D)
            add("info_nce bwd dbank (recompute)", shape, dt, 4 * B * K * D, bank + 4 * K * D + rowsz)
            add("row inv norms of the bank", shape, dt, 2 * K * D, bank + 4 * K)
    for B, M, D in GATHER_SHAPES:
        for dt in ("bf16", "fp32"):
            e = ITEM[dt]
            gathered = B * M * D * e + B * M * 8
            add("info_nce fwd gather (dq in fwd)", f"B={B} M={M} D={D}", dt, 4 * B * M * D, gathered + B * D * e)
    for n in (512 * 3 * 224 * 224, 256 * 3 * 32 * 32):
        for dt in ("fp32", "bf16"):
            add("pgd_step_ linf", f"N={n}", dt, 8 * n, 4 * n * ITEM[dt])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cost_model_h100.csv"))
    args = ap.parse_args(argv)
    rs = rows()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rs[0]))
        w.writeheader()
        w.writerows(rs)
    print("MODEL (H100 SXM peaks; lower bounds, not measurements)")
    for r in rs:
        print(f"{r['op']:40s} {r['shape']:24s} {r['dtype']:5s} {r['gflop']:9.2f} GFLOP {r['mbytes']:9.1f} MB "
              f"{r['lower_bound_us']:9.1f} us  {r['bound']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
