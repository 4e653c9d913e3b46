"""Benchmark the fused normalised cosine similarity (fwd / full) for every provider.

    python benchmarks/bench_similarity.py --quick
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gacd_fast  # noqa: E402
from common import DTYPES, Recorder, Skip, base_parser, peak_extra_mb, progress, time_ms  # noqa: E402
from gacd_fast.ops import reference  # noqa: E402

PROVIDERS = ["gacd_triton", "gacd_cext", "gacd_torch", "torch_eager", "torch_compile"]


def build(provider: str, mode: str, B: int, D: int, dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_()
    if provider.startswith("gacd_"):
        name = provider[5:]
        reason = gacd_fast.backends.unavailable_reason(name, device)
        if reason is not None:
            raise Skip(reason)
        fn = lambda a, b: gacd_fast.cosine_similarity(a, b, backend=name)  # noqa: E731
    elif provider == "torch_eager":
        fn = reference.cosine_similarity
    elif provider == "torch_compile":
        fn = torch.compile(reference.cosine_similarity)
    else:
        raise ValueError(provider)
    if mode == "fwd":
        return lambda: fn(a, b)
    return lambda: torch.autograd.grad(fn(a, b).sum(), [a, b])


def main() -> None:
    args = base_parser(__doc__.splitlines()[0]).parse_args()
    device = torch.device(args.device)
    rec = Recorder("bench_similarity", device)
    reps = args.reps or (30 if device.type == "cuda" else 5)
    sizes = [(16384, 128), (262144, 128)] if args.quick else [(b, d) for b in (65536, 1048576) for d in (128, 256)]
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        for B, D in sizes:
            shape = {"B": B, "D": D}
            for provider in PROVIDERS:
                for mode in ("fwd", "full"):
                    try:
                        fn = build(provider, mode, B, D, dtype, device)
                    except Skip as why:
                        rec.skip(provider, str(why))
                        break
                    p50, p20, p80 = time_ms(fn, device, warmup=3, reps=reps)
                    rec.add("cosine_similarity", provider, mode, dname, shape, "time", "ms", p50, p20, p80)
                    line = f"  cosine_similarity {dname} B={B} D={D} {provider} {mode}: {p50:.3f} ms"
                    if device.type == "cuda" and not args.no_memory:
                        mb = peak_extra_mb(fn, device)
                        rec.add("cosine_similarity", provider, mode, dname, shape, "peak_memory", "MB", mb)
                        line += f", peak extra {mb:.1f} MB"
                    progress(line)
    rec.write(args.out)
    print(rec.summary())


if __name__ == "__main__":
    main()
