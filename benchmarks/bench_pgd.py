"""Benchmark the PGD step kernel and a whole PGD-10 attack for every provider on the same shapes.

``pgd_step``: one linf step (update, projection, clamp) on N float elements; bandwidth counts
3 reads + 1 write per element and is printed next to the device's measured copy bandwidth.
``pgd10_attack``: PGD-10 (eps 8/255, step 2/255) against a ResNet-18 on CIFAR-shaped inputs:
gacd_fast.PGD vs torchattacks.PGD vs the same loop in plain PyTorch; also checks that the
adversarial images are bit-identical to torchattacks' with the same random start.

    python benchmarks/bench_pgd.py --quick
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
    DTYPES, Recorder, Skip, base_parser, device_ceilings, peak_extra_mb, probe_in_subprocess, progress, time_ms,
)

EPS, ALPHA = 8 / 255, 2 / 255
STEP_PROVIDERS = ["gacd_triton", "gacd_cext", "gacd_torch", "torch_eager", "torch_compile"]
ATTACK_PROVIDERS = ["gacd", "torchattacks", "torch_eager"]


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


def plain_pgd(model, x, y, steps=10):
    model.eval()
    adv = torch.clamp(x + torch.empty_like(x).uniform_(-EPS, EPS), 0, 1).detach()
    for _ in range(steps):
        adv.requires_grad_(True)
        grad = torch.autograd.grad(F.cross_entropy(model(adv), y), adv)[0]
        adv = eager_step(adv.detach(), grad, x).detach()
    return adv


def attack_fn(provider: str, batch: int, device: torch.device, random_start: bool = True) -> Callable[[], torch.Tensor]:
    from gacd_fast.distill.models import build_model

    torch.manual_seed(0)
    model = LogitsOnly(build_model("resnet18", 10, 3)).to(device)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(10, (batch,), device=device)
    if provider == "gacd":
        atk = gacd_fast.PGD(model, eps=EPS, alpha=ALPHA, steps=10, random_start=random_start)
        return lambda: atk(x, y)
    if provider == "torchattacks":
        try:
            import torchattacks
        except Exception as exc:
            raise Skip(f"torchattacks not importable: {exc}") from None
        atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=10, random_start=random_start)
        return lambda: atk(x, y)
    if provider == "torch_eager":
        return lambda: plain_pgd(model, x, y)
    raise ValueError(provider)


def bit_identical_to_torchattacks(batch: int, device: torch.device) -> str:
    """Are gacd_fast.PGD's images torchattacks' to the bit? Without random start, so that the steps
    (run by the fastest backend here) are compared, not the random number generators."""
    try:
        ta = attack_fn("torchattacks", batch, device, random_start=False)
    except Skip as why:
        return f"not checked ({why})"
    a = attack_fn("gacd", batch, device, random_start=False)()
    b = ta()
    return "bit-identical" if torch.equal(a, b) else f"differ: max |diff| {float((a - b).abs().max()):.3g}"


def probe(spec: dict) -> None:
    device = torch.device(spec["device"])
    fn = step_fn(spec["provider"], spec["N"], DTYPES[spec["dtype"]], device)
    print(peak_extra_mb(fn, device))


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        return probe(json.loads(args.probe))
    device = torch.device(args.device)
    rec = Recorder("bench_pgd", device)
    reps = args.reps or (30 if device.type == "cuda" else 5)
    ceil = device_ceilings(device)
    progress(f"device ceilings: {ceil}")
    sizes = [3072 * 330, 3072 * 1300] if args.quick else [3072 * 330, 3072 * 3300, 3072 * 16300, 3072 * 32600]
    for dname in args.dtypes.split(","):
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
    batches = [32] if args.quick else [128, 512]
    for batch in batches:
        shape = {"B": batch}
        for provider in ATTACK_PROVIDERS:
            try:
                fn = attack_fn(provider, batch, device)
            except Skip as why:
                rec.skip(provider, str(why))
                continue
            p50, p20, p80 = time_ms(fn, device, warmup=1, reps=max(3, reps // 3))
            rec.add("pgd10_attack", provider, "full", "float32", shape, "time", "ms", p50, p20, p80)
            progress(f"  pgd10_attack resnet18 B={batch} {provider}: {p50:.1f} ms")
        verdict = bit_identical_to_torchattacks(batch, device)
        progress(f"  gacd_fast.PGD vs torchattacks.PGD (same seed), B={batch}: {verdict}")
        print(f"parity B={batch}: {verdict}")
    rec.write(args.out)
    print(rec.summary())


if __name__ == "__main__":
    main()
