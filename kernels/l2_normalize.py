"""The ``l2_normalize`` op's kernels and launchers: forward and backward.

y = x / max(||x||, NORM_EPS) with the overflow-safe fp32 norm of ``_common`` (finite rows of any
magnitude give finite results); backward dx = (dy - y (y.dy)) / ||x|| where ||x|| > eps, dy / eps
elsewhere (the clamp has no gradient). Each program owns BLOCK_R rows and loops over D in BLOCK_D
chunks (two passes: norm, then write), so any D works. ``l2_normalize_backward`` is also the chain
rule of the InfoNCE kernels. Inputs fp16/bf16/fp32; float64 is the torch backend's (the policy is
in gacd_fast/ops/).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import NORM_EPS, launch_rows, row_divisor, scaled_sums


@triton.jit
def _l2_normalize_fwd_kernel(x_ptr, y_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    sx, ssx, _, _, _ = scaled_sums(x_ptr, x_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, False)
    pre, div = row_divisor(sx, ssx)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0)
        y = (x.to(tl.float32) * pre[:, None]) / div[:, None]
        tl.store(y_ptr + off, y.to(x.dtype), mask=m)


@triton.jit
def _l2_normalize_bwd_kernel(x_ptr, dy_ptr, dx_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    sx, ssx, sdy, _, xdy = scaled_sums(x_ptr, dy_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, True)
    nrm = sx * tl.sqrt(ssx)
    pre, div = row_divisor(sx, ssx)
    # y.dy with y = x/den, formed from the scaled sums (no den^3); 0 where the clamp is active
    ydy = tl.where(nrm > NORM_EPS, ((sx * pre) / div) * sdy * xdy, 0.0)
    pre, div = pre[:, None], div[:, None]
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off, mask=m, other=0.0).to(tl.float32)
        dx = ((dy - ((x * pre) / div) * ydy[:, None]) * pre) / div
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=m)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """The ``l2_normalize`` kernel: [N, D] fp16/bf16/fp32 -> [N, D] rows / max(||row||, NORM_EPS) in
    ``x.dtype`` (norm in fp32)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    launch_rows(_l2_normalize_fwd_kernel, x.shape[0], x.shape[1], x, y)
    return y


def l2_normalize_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The ``l2_normalize_backward`` kernel: d x [N, D] in ``x.dtype`` from the output's gradient
    ``grad`` [N, D] (any float dtype, e.g. the fp32 gradients of the InfoNCE kernels)."""
    x, grad = x.contiguous(), grad.contiguous()
    dx = torch.empty_like(x)
    launch_rows(_l2_normalize_bwd_kernel, x.shape[0], x.shape[1], x, grad, dx)
    return dx
