"""The ``cosine_similarity`` op's kernels and launchers: forward and backward.

cos_i = normalize(a)_i . normalize(b)_i in fp32 with the overflow-safe row norms of ``_common``;
one pass over D gives both norms and the dot. Inputs fp16/bf16/fp32; float64 is the torch
backend's (the policy is in gacd_fast/ops/).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NORM_EPS, launch_rows, row_divisor, scaled_sums


@triton.jit
def _cosine_similarity_parts(a_ptr, b_ptr, rows, rmask, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(cos, then per side the (pre, div) of row_divisor, then ||a|| > eps, ||b|| > eps) per row,
    overflow-safe."""
    sa, ssa, sb, ssb, ab = scaled_sums(a_ptr, b_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, True)
    pa, da = row_divisor(sa, ssa)
    pb, db = row_divisor(sb, ssb)
    cos = ab * ((sa * pa) / da) * ((sb * pb) / db)
    return cos, pa, da, pb, db, sa * tl.sqrt(ssa) > NORM_EPS, sb * tl.sqrt(ssb) > NORM_EPS


@triton.jit
def _cosine_similarity_fwd_kernel(a_ptr, b_ptr, out_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    cos = _cosine_similarity_parts(a_ptr, b_ptr, rows, rmask, D, BLOCK_R, BLOCK_D)[0]
    tl.store(out_ptr + rows, cos, mask=rmask)


@triton.jit
def _cosine_similarity_bwd_kernel(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """da = g (b^ - a^ cos [||a|| > eps]) / max(||a||, eps), and symmetrically db."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    cos, pa, da_, pb, db_, a_big, b_big = _cosine_similarity_parts(a_ptr, b_ptr, rows, rmask, D, BLOCK_R, BLOCK_D)
    pa, da_, pb, db_ = pa[:, None], da_[:, None], pb[:, None], db_[:, None]
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    ca = tl.where(a_big, cos, 0.0)
    cb = tl.where(b_big, cos, 0.0)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        a = tl.load(a_ptr + off, mask=m, other=0.0)
        b = tl.load(b_ptr + off, mask=m, other=0.0)
        ua = (a.to(tl.float32) * pa) / da_
        ub = (b.to(tl.float32) * pb) / db_
        gda = ((g[:, None] * (ub - ua * ca[:, None])) * pa) / da_
        gdb = ((g[:, None] * (ua - ub * cb[:, None])) * pb) / db_
        tl.store(da_ptr + off, gda.to(a.dtype), mask=m)
        tl.store(db_ptr + off, gdb.to(b.dtype), mask=m)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``cosine_similarity`` kernel: [B, D], [B, D] (fp16/bf16/fp32) -> [B] fp32 cosine of the
    L2-normalised rows."""
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    launch_rows(_cosine_similarity_fwd_kernel, a.shape[0], a.shape[1], a, b, out)
    return out


def cosine_similarity_backward(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cosine_similarity_backward`` kernel: (d a, d b) in the inputs' dtypes from ``grad`` [B]."""
    a, b, g = a.contiguous(), b.contiguous(), grad.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    launch_rows(_cosine_similarity_bwd_kernel, a.shape[0], a.shape[1], a, b, g, da, db)
    return da, db
