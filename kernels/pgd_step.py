"""The ``pgd_step_`` op's kernels and launcher: one fused PGD step, linf or l2, in place.

linf mirrors the reference (torchattacks' order) op for op, rounding to the image dtype after each
torch op, so float32 results are bitwise equal:
    step = round(alpha * sign(grad)); adv = round(x_adv + step); d = round(adv - x_nat)
    delta = clamp(d, -eps, eps); out = clamp(round(x_nat + delta), clip_min, clip_max)
(alpha*sign is exact in fp32, so an FMA contraction on a GPU cannot change it).
l2 is three-phase: per-sample partial reductions (max |grad|, then the sum of squares of the scaled
grad, then of the stepped perturbation) are written per (sample, chunk) and reduced in a fixed order
by torch, then one elementwise pass applies step, projection and clamp. The direction is the
reference's ``l2_direction``: NaN elements count as 0, the max |grad| scaling keeps the norm from
overflowing, and +-inf elements give the limit direction. Math is fp32: the backend sends float64
images elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, elementwise_block, interpreting, pow2, round_to


@triton.jit
def _sign(g):
    return tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0))  # sign(0) = sign(nan) = 0, like torch.sign


@triton.jit
def _pgd_step_linf_kernel(x_ptr, g_ptr, nat_ptr, alpha_ptr, eps_ptr, alpha_f, eps_f, lo, hi, numel, row_len,
                     ALPHA_T: tl.constexpr, EPS_T: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    dt = x.dtype
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    row = offs // row_len
    if ALPHA_T:
        a = tl.load(alpha_ptr + row, mask=mask, other=0.0).to(tl.float32)
    else:
        a = alpha_f
    if EPS_T:
        e = tl.load(eps_ptr + row, mask=mask, other=0.0).to(tl.float32)
    else:
        e = eps_f
    step = round_to(a * _sign(g), dt)
    adv = round_to(x.to(tl.float32) + step, dt)
    d = round_to(adv - nat, dt)
    # torch clamps against a Python scalar in fp32 (opmath) and rounds the result
    delta = round_to(tl.minimum(tl.maximum(d, -e), e), dt)
    out = round_to(nat + delta, dt)
    out = round_to(tl.minimum(tl.maximum(out, lo), hi), dt)
    tl.store(x_ptr + offs, out.to(dt, fp_downcast_rounding="rtne") if dt != tl.float32 else out, mask=mask)


@triton.jit
def _l2_scaled(g, gmax):
    """The reference's u: NaN -> 0; g / max|g|; with an inf max, +-1 on the inf elements, 0 elsewhere."""
    g = tl.where(g != g, 0.0, g)
    inf_u = tl.where(g == float("inf"), 1.0, tl.where(g == -float("inf"), -1.0, 0.0))
    fin_u = g / tl.where(gmax > 0, gmax, 1.0)
    return tl.where(gmax == float("inf"), inf_u, fin_u)


@triton.jit
def _l2_delta(x, g, nat, a, gmax, unorm):
    # reference: unit = u / ||u|| (0 where the norm is 0); adv = x + alpha*unit; delta = adv - nat
    u = _l2_scaled(g, gmax)
    unit = tl.where(unorm > 0, u / tl.where(unorm > 0, unorm, 1.0), 0.0)  # no 0/0 in dead lanes
    return (x + a * unit) - nat


@triton.jit
def _pgd_step_l2_partial_kernel(x_ptr, g_ptr, nat_ptr, alpha_ptr, gmax_ptr, unorm_ptr, part_ptr, row_len, n_chunks,
                       PHASE: tl.constexpr, BLOCK: tl.constexpr):
    """Per (sample, chunk): PHASE 0 max |grad| (NaN skipped); 1 sum of u^2; 2 sum of delta^2."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_len
    offs = b * row_len + cols
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PHASE == 0:
        r = tl.max(tl.where(g != g, 0.0, tl.abs(g)), axis=0)
    else:
        gmax = tl.load(gmax_ptr + b)
        if PHASE == 1:
            v = _l2_scaled(g, gmax)
        else:
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            nat = tl.load(nat_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(alpha_ptr + b).to(tl.float32)
            un = tl.load(unorm_ptr + b)
            v = tl.where(mask, _l2_delta(x, g, nat, a, gmax, un), 0.0)
        r = tl.sum(v * v, axis=0)
    tl.store(part_ptr + b * n_chunks + c, r)


@triton.jit
def _pgd_step_l2_apply_kernel(x_ptr, g_ptr, nat_ptr, alpha_ptr, eps_ptr, gmax_ptr, unorm_ptr, dnorm_ptr, lo, hi, row_len,
                     BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    cols = c * BLOCK + tl.arange(0, BLOCK)
    mask = cols < row_len
    offs = b * row_len + cols
    xr = tl.load(x_ptr + offs, mask=mask, other=0.0)
    dt = xr.dtype
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    nat_r = tl.load(nat_ptr + offs, mask=mask, other=0.0)
    a = tl.load(alpha_ptr + b).to(tl.float32)
    e = tl.load(eps_ptr + b).to(tl.float32)
    gmax = tl.load(gmax_ptr + b)
    un = tl.load(unorm_ptr + b)
    dn = tl.load(dnorm_ptr + b)
    delta = _l2_delta(xr.to(tl.float32), g, nat_r.to(tl.float32), a, gmax, un)
    scale = tl.where(dn > e, e / dn, 1.0)
    delta = round_to(delta * scale, dt)
    out = round_to(nat_r.to(tl.float32) + delta, dt)
    out = round_to(tl.minimum(tl.maximum(out, lo), hi), dt)
    tl.store(x_ptr + offs, out.to(dt, fp_downcast_rounding="rtne") if dt != tl.float32 else out, mask=mask)


def _row_block(row_len: int) -> int:
    return pow2(row_len, 16, 1 << 16) if interpreting() else pow2(row_len, 16, 2048)


def _per_sample_f32(v: Optional[torch.Tensor], f: float, batch: int, device: torch.device) -> torch.Tensor:
    """[B] fp32 per-sample values: the tensor ``v``, else ``f`` for every sample."""
    if v is not None:
        return v.to(torch.float32).contiguous()
    return torch.full((batch,), f, dtype=torch.float32, device=device)


def pgd_step_(x_adv, grad, x_nat, alpha_t, alpha, eps_t, eps, clip_min, clip_max, norm) -> None:
    """The ``pgd_step_`` kernel (schema: gacd_fast/ops/pgd_step.py): one step in place on ``x_adv``
    [B, ...] (fp16/bf16/fp32; ``grad``, ``x_nat`` alike). Tensors alpha_t/eps_t [B] override the floats."""
    x = x_adv if x_adv.is_contiguous() else x_adv.contiguous()
    g = grad.contiguous()
    nat = x_nat.contiguous()
    batch = x.shape[0]
    numel = x.numel()
    row_len = numel // batch
    dt = x.dtype
    lo, hi = float(clip_min), float(clip_max)
    if norm == "linf":
        a_t = alpha_t.to(dt).contiguous() if alpha_t is not None else None
        e_t = eps_t.to(dt).contiguous() if eps_t is not None else None
        block = elementwise_block(numel)
        _pgd_step_linf_kernel[(cdiv(numel, block),)](
            x, g, nat, a_t if a_t is not None else x, e_t if e_t is not None else x,
            float(alpha), float(eps), lo, hi, numel, row_len,
            ALPHA_T=a_t is not None, EPS_T=e_t is not None, BLOCK=block,
        )
    else:
        # l2: the reference converts tensor alpha/eps to the accumulation dtype (fp32), not the image dtype
        a32 = _per_sample_f32(alpha_t, alpha, batch, x.device)
        e32 = _per_sample_f32(eps_t, eps, batch, x.device)
        block = _row_block(row_len)
        chunks = cdiv(row_len, block)
        part = torch.empty((batch, chunks), dtype=torch.float32, device=x.device)
        grid = (batch, chunks)
        _pgd_step_l2_partial_kernel[grid](x, g, nat, a32, a32, a32, part, row_len, chunks, PHASE=0, BLOCK=block)
        gmax = part.amax(1)
        _pgd_step_l2_partial_kernel[grid](x, g, nat, a32, gmax, a32, part, row_len, chunks, PHASE=1, BLOCK=block)
        unorm = part.sum(1).sqrt()  # fixed-order reduction of the partials: deterministic
        _pgd_step_l2_partial_kernel[grid](x, g, nat, a32, gmax, unorm, part, row_len, chunks, PHASE=2, BLOCK=block)
        dnorm = part.sum(1).sqrt()
        _pgd_step_l2_apply_kernel[grid](x, g, nat, a32, e32, gmax, unorm, dnorm, lo, hi, row_len, BLOCK=block)
    if x is not x_adv:
        x_adv.copy_(x)
