"""The PGD random start op: its definition and the Triton backend's fused linf start (the other
backends run the reference: torch's RNG draws exactly torchattacks' start, one elementwise pass)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .contract import CompiledOp, Op
from .norms import per_sample
from .pgd_step import split_scalar
from .self_check import SEED, SelfCheckMismatch, Tolerance, rand


def reference(
    x_nat: torch.Tensor, eps: float | torch.Tensor, norm: str, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """A random point of the eps-ball around ``x_nat`` [B, ...], clamped to [0, 1] (torchattacks'
    starts): linf ``clamp(x + U(-eps, eps), 0, 1)``; l2 a random direction scaled to a uniform
    radius in [0, eps]. eps: a float or per-sample [B] tensor. ``generator`` makes it reproducible."""
    g = generator
    if norm == "linf":
        if isinstance(eps, torch.Tensor):
            noise = (torch.rand(x_nat.shape, generator=g, device=x_nat.device, dtype=x_nat.dtype) * 2 - 1)
            noise = noise * per_sample(eps, x_nat)
        else:
            noise = torch.empty_like(x_nat).uniform_(-eps, eps, generator=g)
    else:
        direction = torch.randn(x_nat.shape, generator=g, device=x_nat.device, dtype=x_nat.dtype)
        n = direction.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x_nat.dim() - 1)))
        r = torch.rand(n.shape, generator=g, device=x_nat.device, dtype=x_nat.dtype)
        noise = direction * (r / n * per_sample(eps, n))
    return torch.clamp(x_nat + noise, 0, 1)


def _fake_linf(x_nat, eps_t, eps, seed):
    torch._check(x_nat.dim() >= 1, lambda: f"x_nat must be [B, ...], got shape {tuple(x_nat.shape)}")
    if eps_t is not None:
        torch._check(eps_t.shape == (x_nat.shape[0],),
                     lambda: f"eps_t must be [B={x_nat.shape[0]}], got {tuple(eps_t.shape)}")
    return x_nat.new_empty(x_nat.shape)


# clamp(x_nat + U(-eps, eps), 0, 1), the noise keyed by (seed, flat element index).
LINF_START = CompiledOp("pgd_random_start_linf", "(Tensor x_nat, Tensor? eps_t, float eps, int seed) -> Tensor",
                        _fake_linf)


def _call(start, x_nat, eps, norm, generator):
    """The linf start from the operator, keyed on a seed drawn from ``generator`` (so reproducible
    for a given generator state): a new tensor like ``x_nat`` [B, ...]."""
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=device))
    return start(x_nat, *split_scalar(eps), seed)


def _self_check(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    """Random draws differ between backends by design: the start must lie in the eps-ball and [0, 1]."""
    gen = torch.Generator().manual_seed(SEED)
    x_nat = rand(gen, (3, 2, 5), device, dtype, 0.0, 1.0)
    eps = 0.1
    draw = torch.Generator(device=device).manual_seed(SEED)
    got = fn(x_nat, eps, "linf", draw)
    if tuple(got.shape) != tuple(x_nat.shape) or got.dtype != x_nat.dtype or got.device != x_nat.device:
        raise SelfCheckMismatch(f"pgd_random_start: got {tuple(got.shape)} {got.dtype} on {got.device}, expected "
                                f"{tuple(x_nat.shape)} {x_nat.dtype} on {x_nat.device}")
    g, x = got.detach().to("cpu", torch.float64), x_nat.to("cpu", torch.float64)
    atol = tol[0] + tol[1]
    if not (bool(torch.isfinite(g).all()) and bool(((g - x).abs() <= eps + atol).all())
            and bool((g >= -atol).all()) and bool((g <= 1 + atol).all())):
        raise SelfCheckMismatch("pgd_random_start (linf): a start outside the eps-ball or [0, 1]")


OP = Op("pgd_random_start", "pgd_random_start", reference, compiled=(LINF_START,), call=_call,
        compiled_when=lambda x_nat, eps, norm, generator: norm == "linf", compiled_in=("triton",),
        torch_elsewhere=True, self_check=_self_check)
