"""The PGD step op: its definition and the contract of its compiled backends."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._numerics import acc_dtype
from .contract import CompiledOp, Op, check_like
from .norms import per_sample, sample_norms
from .self_check import SEED, Tolerance, compare, rand


def l2_direction(grad: torch.Tensor) -> torch.Tensor:
    """Per-sample grad / ||grad|| [B, ...] in the accumulation dtype, 0 where there is no direction.

    NaN elements count as 0 (no step along them, as sign(NaN) = 0 in linf). Overflow-safe: each
    sample is scaled by its max |grad| first; with +-inf elements the direction is their limit
    (+-1 on the inf elements, 0 elsewhere, then unit length)."""
    acc = acc_dtype(grad.dtype)
    zero = torch.zeros((), dtype=acc, device=grad.device)
    g = grad.to(acc)
    g = torch.where(torch.isnan(g), zero, g)
    m = g.abs().flatten(1).amax(1).view(-1, *([1] * (g.dim() - 1)))
    u = torch.where(torch.isinf(m), torch.where(torch.isinf(g), g.sign(), zero),
                    g / torch.where(m > 0, m, torch.ones_like(m)))
    n = sample_norms(u)
    return torch.where(n > 0, u / torch.where(n > 0, n, torch.ones_like(n)), zero)


def reference(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    alpha: float | torch.Tensor,
    eps: float | torch.Tensor,
    clip_min: float,
    clip_max: float,
    norm: str,
) -> torch.Tensor:
    """One PGD step in place on ``x_adv`` [B, ...] (``grad``, ``x_nat`` alike); returns ``x_adv``.

    alpha, eps: floats or per-sample [B] tensors.
    linf, in torchattacks' op order (bitwise):
        x_adv <- clamp(x_nat + clamp(x_adv + alpha*sign(grad) - x_nat, -eps, eps), clip_min, clip_max)
    l2: step alpha * grad / ||grad|| per sample (none where ||grad|| == 0; see ``l2_direction``
        for NaN and inf), project the perturbation onto the eps-ball (scale by
        min(1, eps/||delta||)), then clamp.
    NaN in grad takes no step (sign(NaN) = 0); NaN in x_adv or x_nat propagates.
    """
    a = per_sample(alpha, x_adv)
    e = per_sample(eps, x_adv)
    if norm == "linf":
        # One temporary, in place; each op rounds exactly as torchattacks' out-of-place chain
        # (adv = x_adv + a*sign(g); delta = clamp(adv - x_nat, -e, e); clamp(x_nat + delta, ...)).
        delta = grad.sign().mul_(a).add_(x_adv).sub_(x_nat).clamp_(min=-e, max=e)
    else:
        acc = acc_dtype(x_adv.dtype)
        unit = l2_direction(grad)
        adv = x_adv.to(acc) + per_sample(alpha, unit) * unit
        delta = adv - x_nat.to(acc)
        d_norm = sample_norms(delta)
        e_acc = per_sample(eps, delta)
        scale = torch.where(d_norm > e_acc, e_acc / d_norm, 1.0)  # d_norm > e_acc >= 0 there
        delta = (delta * scale).to(x_adv.dtype)
    return torch.clamp(delta.add_(x_nat), clip_min, clip_max, out=x_adv)


def _fake(x_adv, grad, x_nat, alpha_t, alpha, eps_t, eps, clip_min, clip_max, norm) -> None:
    torch._check(x_adv.dim() >= 1, lambda: f"x_adv must be [B, ...], got shape {tuple(x_adv.shape)}")
    check_like("grad", grad, "x_adv", x_adv)
    check_like("x_nat", x_nat, "x_adv", x_adv)
    for name, t in (("alpha_t", alpha_t), ("eps_t", eps_t)):
        if t is not None:
            torch._check(t.shape == (x_adv.shape[0],),
                         lambda: f"{name} must be [B={x_adv.shape[0]}], got {tuple(t.shape)}")
    torch._check(norm in ("linf", "l2"), lambda: f"norm must be 'linf' or 'l2', got {norm!r}")


# In place on x_adv (contiguous). alpha/eps: the per-sample tensor [B] when given, else the float.
STEP = CompiledOp(
    "pgd_step_",
    "(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? alpha_t, float alpha, Tensor? eps_t, float eps, "
    "float clip_min, float clip_max, str norm) -> ()",
    _fake,
)


def split_scalar(v: float | torch.Tensor) -> tuple[Optional[torch.Tensor], float]:
    """The schema's (tensor, float) pair for a per-sample tensor or a float."""
    return (v, 0.0) if isinstance(v, torch.Tensor) else (None, float(v))


def _call(step, x_adv, grad, x_nat, alpha, eps, clip_min, clip_max, norm):
    """The step in place on ``x_adv`` through the operator, which writes a contiguous tensor: a
    strided ``x_adv`` gets the result copied back."""
    target = x_adv if x_adv.is_contiguous() else x_adv.contiguous()
    step(target, grad, x_nat, *split_scalar(alpha), *split_scalar(eps), float(clip_min), float(clip_max), norm)
    if target is not x_adv:
        x_adv.copy_(target)
    return x_adv


def _self_check(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    """The first-use check: linf with scalars, l2 with a per-sample eps."""
    gen = torch.Generator().manual_seed(SEED)
    shape = (3, 2, 5)
    x_nat = rand(gen, shape, device, dtype, 0.0, 1.0)
    x_adv = (x_nat + rand(gen, shape, device, dtype, -0.05, 0.05)).clamp(0, 1)
    grad = rand(gen, shape, device, dtype)
    eps_t = rand(gen, (shape[0],), device, dtype, 0.02, 0.1)
    for norm, alpha, eps in (("linf", 0.03, 0.06), ("l2", 0.1, eps_t)):
        got = fn(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, norm)
        want = reference(x_adv.to(torch.float64), grad.to(torch.float64), x_nat.to(torch.float64), alpha,
                         eps.to(torch.float64) if isinstance(eps, torch.Tensor) else eps, 0.0, 1.0, norm)
        compare(f"pgd_step_ ({norm}): x_adv", got, want, tol)


OP = Op("pgd_step", "pgd_step_", reference, compiled=(STEP,), call=_call, self_check=_self_check)
