"""Benchmark the PGD step kernel and a whole PGD-10 attack for every provider on the same shapes.

``pgd_step``: one linf step (update, projection, clamp) on N float elements; bandwidth counts
3 reads + 1 write per element and is printed next to the device's measured copy bandwidth.
``pgd10_<workload>``: a whole PGD-10 attack on ResNet-18 (CIFAR-shaped, eps 8/255, step 2/255) and
on the small CNNs of digits and MNIST-5k, for every variant of ``workloads.VARIANTS`` side by side:
a plain loop, torchattacks, gacd_fast fp32 and bf16, the plain loop and gacd_fast also in
channels_last; time, images/s, peak memory, the ratios and issue 20's targets; also checks that
gacd_fast's fp32 images are bit-identical to torchattacks' with the same start, and how far
channels_last moves them.

    python benchmarks/bench_pgd.py --quick
    python benchmarks/bench_pgd.py --quick --no-steps --workloads resnet18 --variants "plain fp32,gacd_cl fp32"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gacd_fast  # noqa: E402
from common import (  # noqa: E402
    DTYPES, Recorder, Skip, base_parser, device_ceilings, peak_extra_mb, probe_in_subprocess, progress,
    time_ms,
)
from workloads import (  # noqa: E402
    WORKLOADS, Variant, add_variants_option, images, model, summary, time_variants, warm_library,
)

EPS, ALPHA = 8 / 255, 2 / 255
STEP_PROVIDERS = ["gacd_triton", "gacd_cext", "gacd_torch", "torch_eager", "torch_compile"]


def eager_step(adv, grad, x):
    """torchattacks' update, literally (new tensors each op)."""
    adv = adv + ALPHA * grad.sign()
    delta = torch.clamp(adv - x, min=-EPS, max=EPS)
    return torch.clamp(x + delta, min=0, max=1)


def step_fn(provider: str, n: int, dtype: torch.dtype, device: torch.device) -> Callable[[], object]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(n // 3072, 3, 32, 32, generator=g).to(device, dtype)  # sizes are CIFAR batches
    adv = (x + 0.01).clamp(0, 1)
    grad = torch.randn(x.shape, generator=g).to(device, dtype)
    if provider.startswith("gacd_"):
        name = provider[5:]
        reason = gacd_fast.backends.unavailable_reason(name, device)
        if reason is not None:
            raise Skip(reason)
        return lambda: gacd_fast.pgd_step_(adv, grad, x, alpha=ALPHA, eps=EPS, backend=name)
    if provider == "torch_eager":
        return lambda: eager_step(adv, grad, x)
    if provider == "torch_compile":
        compiled = torch.compile(eager_step)
        return lambda: compiled(adv, grad, x)
    raise ValueError(provider)


class LogitsOnly(nn.Module):
    """torchattacks wants logits; our models return (features, logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[1]


def plain_pgd(model, x, y, steps=10, eps=EPS, alpha=ALPHA):
    """PGD as a user writes it without a library: torchattacks' loop and update, literally."""
    model.eval()
    adv = torch.clamp(x + torch.empty_like(x).uniform_(-eps, eps), 0, 1).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)[0]
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.clamp(x + torch.clamp(adv - x, min=-eps, max=eps), min=0, max=1).detach()
    return adv


def attack_fn(workload: str, variant: Variant, batch: int, device: torch.device, random_start: bool = True,
              steps: int = 10) -> Callable[[], torch.Tensor]:
    """One PGD-``steps`` attack on the workload's student (in eval mode) by ``variant``."""
    wl = WORKLOADS[workload]
    net = LogitsOnly(model(wl.student, wl, variant, device))
    x, y = images(wl, batch, variant, device)
    if variant.base == "gacd":
        atk = gacd_fast.PGD(net, eps=wl.eps, alpha=wl.alpha, steps=steps, random_start=random_start,
                            precision=variant.precision)
        return lambda: atk(x, y)
    if variant.precision != "fp32":
        raise ValueError(f"{variant.provider} runs fp32 only")
    if variant.provider == "torchattacks":
        try:
            import torchattacks
        except Exception as exc:
            raise Skip(f"torchattacks not importable: {exc}") from None
        atk = torchattacks.PGD(net, eps=wl.eps, alpha=wl.alpha, steps=steps, random_start=random_start)
        return lambda: atk(x, y)
    if variant.base == "plain":
        return lambda: plain_pgd(net, x, y, steps, wl.eps, wl.alpha)
    raise ValueError(variant.provider)


def same_images(a: Variant, b: Variant, batch: int, device: torch.device) -> str:
    """Do variants ``a`` and ``b`` return the same images on ResNet-18? Without random start, so
    that the steps are compared, not the random number generators. gacd fp32 against torchattacks
    must be bit-identical; another memory format sums the convolutions in another order."""
    try:
        fa, fb = (attack_fn("resnet18", v, batch, device, random_start=False) for v in (a, b))
    except Skip as why:
        return f"not checked ({why})"
    x, y = fa(), fb()
    if torch.equal(x, y):
        return "bit-identical"
    return f"differ on {float((x != y).float().mean()):.2%} of the pixels, max |diff| {float((x - y).abs().max()):.3g}"


def probe(spec: dict) -> None:
    device = torch.device(spec["device"])
    if spec.get("kind") == "attack":  # a whole attack: the peak of its first call in a fresh process
        warm_library(device)
        fn = attack_fn(spec["workload"], Variant(spec["provider"], spec["precision"]), spec["B"], device)
        print(peak_extra_mb(fn, device, warmup=False))
        return
    fn = step_fn(spec["provider"], spec["N"], DTYPES[spec["dtype"]], device)
    print(peak_extra_mb(fn, device))


# PGD-10 on each workload's student, at these batch sizes (quick: the ResNet-18 B=32)
ATTACK_BATCHES = {"quick": {"resnet18": [32], "small_cnn_digits": [64], "small_cnn_mnist5k": [32]},
                  "full": {"resnet18": [128, 512], "small_cnn_digits": [256], "small_cnn_mnist5k": [256]}}
# issue 20's targets: (what, variant, baseline, bound), checked on the run's own figures
ATTACK_TARGETS = {"pgd10_resnet18": [("speedup", "gacd bf16", "torchattacks fp32", 2.0),
                                     ("time_ratio", "gacd fp32", "torchattacks fp32", 1.0)]}


def attack_benchmarks(rec: Recorder, args: argparse.Namespace, device: torch.device) -> None:
    """PGD-10 per workload and batch for every variant, side by side and interleaved (one attack
    of each per round: median of --reps rounds, 5 on a CPU), images/s, peak memory; half
    precisions this device only emulates get one timed call."""
    reps = args.reps or (10 if device.type == "cuda" else 5)
    for workload, batches in ATTACK_BATCHES["quick" if args.quick else "full"].items():
        if workload not in args.workloads.split(","):
            continue
        for batch in batches:
            op, shape = f"pgd10_{workload}", {"B": batch}
            fns, variants = {}, {}
            for variant in args.variants:
                try:
                    fns[variant.label] = attack_fn(workload, variant, batch, device)
                    variants[variant.label] = variant
                except Skip as why:
                    rec.skip(variant.provider, str(why))
            time_variants(rec, op, shape, fns, variants, device, reps=reps, batch=batch,
                          describe=lambda ms: f"{ms:.1f} ms, {batch / (ms / 1e3):.1f} images/s",
                          memory_spec=None if args.no_memory else lambda v: dict(
                              kind="attack", workload=workload, provider=v.provider, precision=v.precision, B=batch,
                              device=str(device)),
                          script=Path(__file__))
            if workload == "resnet18":
                for a, b in ((Variant("gacd"), Variant("torchattacks")), (Variant("gacd_cl"), Variant("gacd"))):
                    if a in args.variants and b in args.variants:
                        verdict = same_images(a, b, batch, device)
                        progress(f"  {a.label} vs {b.label} (no random start), B={batch}: {verdict}")
                        print(f"parity {a.label} vs {b.label}, B={batch}: {verdict}")


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--no-steps", action="store_true", help="skip the pgd_step kernel benchmark")
    ap.add_argument("--no-attacks", action="store_true", help="skip the whole-attack benchmark")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated workloads of the attack benchmark (default: all: {','.join(WORKLOADS)})")
    add_variants_option(ap)
    args = ap.parse_args()
    if args.probe:
        return probe(json.loads(args.probe))
    device = torch.device(args.device)
    rec = Recorder("bench_pgd", device)
    reps = args.reps or (30 if device.type == "cuda" else 5)
    ceil = device_ceilings(device)
    progress(f"device ceilings: {ceil}")
    sizes = [3072 * 330, 3072 * 1300] if args.quick else [3072 * 330, 3072 * 3300, 3072 * 16300, 3072 * 32600]
    for dname in ([] if args.no_steps else args.dtypes.split(",")):
        dtype = DTYPES[dname]
        elem = torch.empty((), dtype=dtype).element_size()
        for n in sizes:
            shape = {"N": n}
            rec.add("pgd_step", "copy_ceiling", "fwd", dname, shape, "bandwidth", "GB/s", ceil["copy_GBps"])
            for provider in STEP_PROVIDERS:
                try:
                    fn = step_fn(provider, n, dtype, device)
                except Skip as why:
                    rec.skip(provider, str(why))
                    continue
                p50, p20, p80 = time_ms(fn, device, warmup=3, reps=reps)
                gbps = 4 * n * elem / (p50 * 1e-3) / 1e9
                rec.add("pgd_step", provider, "fwd", dname, shape, "time", "ms", p50, p20, p80)
                rec.add("pgd_step", provider, "fwd", dname, shape, "bandwidth", "GB/s", gbps)
                line = f"  pgd_step {dname} N={n} {provider}: {p50:.3f} ms, {gbps:.1f} GB/s ({gbps / ceil['copy_GBps']:.0%} of copy)"
                if not args.no_memory:
                    spec = dict(provider=provider, N=n, dtype=dname, device=str(device))
                    mb = probe_in_subprocess(Path(__file__), spec) if device.type == "cpu" else peak_extra_mb(fn, device)
                    rec.add("pgd_step", provider, "fwd", dname, shape, "peak_memory", "MB", mb)
                    line += f", peak extra {mb:.1f} MB"
                progress(line)
    if not args.no_attacks:
        attack_benchmarks(rec, args, device)
    rec.write(args.out)
    if not args.no_steps:
        print(rec.summary(only=lambda r: r["op"] == "pgd_step"))
    print(summary([r for r in rec.rows if r["op"].startswith("pgd10_")], ATTACK_TARGETS))


if __name__ == "__main__":
    main()
