"""Row norms as the reference computes them: overflow-safe, in the accumulation dtype."""
from __future__ import annotations

import torch

from .._numerics import NORM_EPS, acc_dtype


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row max |x| [..., 1] where it is finite and > 0, else 1 (a constant: no gradient)."""
    m = x.detach().abs().amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1, eps=NORM_EPS)``, overflow-safe: rows are scaled by their max |x|
    before the norm, so a finite row of any magnitude (float32 up to 3e38) normalises instead of its
    squared norm overflowing to inf. x / max(||x||, eps) = (x/s) / max(||x/s||, eps/s), and with a
    constant s the gradient is that of F.normalize."""
    s = _row_scale(x)
    y = x / s
    return y / torch.maximum(y.norm(p=2, dim=-1, keepdim=True), NORM_EPS / s)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` upcast to the accumulation dtype and L2-normalised."""
    return l2_normalize(x.to(acc_dtype(x.dtype)))


def sample_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm of ``x`` [B, ...] over all non-batch dims, in the accumulation dtype,
    shaped [B, 1, ...] to broadcast against ``x``."""
    n = x.to(acc_dtype(x.dtype)).flatten(1).norm(p=2, dim=1)
    return n.view(-1, *([1] * (x.dim() - 1)))


def per_sample(v: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A per-sample [B] tensor viewed to broadcast over ``like`` [B, ...] in its dtype (floats pass)."""
    if isinstance(v, torch.Tensor):
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return v
