"""Row L2-normalisation and row-wise cosine similarity, forward and backward: kernels and launchers.

``F.normalize`` semantics: y = x / max(||x||, NORM_EPS) with the norm in fp32, computed as
max|x| * sqrt(sum (x / max|x|)^2) so that finite rows of any magnitude (norms up to ~1e38) give
finite results; backward
dx = (dy - y (y.dy)) / ||x|| where ||x|| > eps, dy / eps elsewhere (the clamp has no gradient).
Each program owns BLOCK_R rows and loops over D in BLOCK_D chunks (two passes: norm, then write),
so any D works. ``row_inv_norms`` is also used by the InfoNCE kernels (inverse norms computed
once per row, applied inside their tiles). Inputs fp16/bf16/fp32; float64 is handled by the
backend with the torch reference.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gacd_fast._numerics import NORM_EPS as _NORM_EPS

from ._common import cdiv, interpreting, pow2

NORM_EPS = tl.constexpr(_NORM_EPS)  # F.normalize's eps, as a constexpr global the kernels can read


@triton.jit
def _rescale(scale, x):
    """New running scale max(scale, max|x| per row) and the factor old/new for the sums so far
    (1 where the scale did not grow: also when it is inf already, where inf/inf would be NaN)."""
    new = tl.maximum(scale, tl.max(tl.abs(x), axis=1))
    return new, tl.where(new > scale, scale / new, 1.0)


@triton.jit
def _unit(x, scale):
    """x / scale per row (0 where the scale is 0): entries in [-1, 1], squares cannot overflow.
    An infinite entry counts as +-1 (not inf/inf = NaN), so a row with inf has norm inf and
    normalises to NaN there and 0 elsewhere, as F.normalize; NaN entries stay NaN."""
    u = x / tl.where(scale > 0, scale, 1.0)[:, None]
    return tl.where(tl.abs(x) == float("inf"), tl.where(x > 0, 1.0, -1.0), u)


@triton.jit
def _row_divisor(s, ss):
    """(pre, div) per row with max |x| = s and sum (x/s)^2 = ss: v / max(||x||, NORM_EPS) is
    (v * pre) / div. pre = 1 and div the clamped norm, except for a finite row whose norm exceeds
    float32's range (twenty entries of 1e38: the norm would be inf and every quotient 0): there
    pre = div's scale-down 2^-64 (exact), so div stays finite. Per row, not per element: the
    element work is one multiply and one divide whatever the row."""
    nrm = s * tl.sqrt(ss)
    over = (nrm == float("inf")) & (s < float("inf"))
    pre = tl.where(over, 5.421010862427522e-20, 1.0)  # 2^-64
    return pre, tl.where(over, (s * pre) * tl.sqrt(ss), tl.maximum(nrm, NORM_EPS))


@triton.jit
def _scaled_sums(x_ptr, y_ptr, rows, rmask, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WITH_Y: tl.constexpr):
    """Per row, over D in one pass (fp32): sx = max|x|, ssx = sum (x/sx)^2, and with ``WITH_Y``
    sy, ssy likewise and xy = sum (x/sx)(y/sy). Sums are rescaled whenever a chunk raises the max,
    so ||x|| = sx sqrt(ssx) and x.y = sx sy xy never overflow for finite rows (the F.normalize
    policy for rows of any magnitude). rows are int64 [BLOCK_R]."""
    sx = tl.zeros([BLOCK_R], dtype=tl.float32)
    ssx = tl.zeros([BLOCK_R], dtype=tl.float32)
    sy = tl.zeros([BLOCK_R], dtype=tl.float32)
    ssy = tl.zeros([BLOCK_R], dtype=tl.float32)
    xy = tl.zeros([BLOCK_R], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        sx, fx = _rescale(sx, x)
        ux = _unit(x, sx)
        ssx = ssx * fx * fx + tl.sum(ux * ux, axis=1)
        if WITH_Y:
            y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
            sy, fy = _rescale(sy, y)
            uy = _unit(y, sy)
            ssy = ssy * fy * fy + tl.sum(uy * uy, axis=1)
            xy = xy * fx * fy + tl.sum(ux * uy, axis=1)
    return sx, ssx, sy, ssy, xy


@triton.jit
def _inv_norm_kernel(x_ptr, out_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    sx, ssx, _, _, _ = _scaled_sums(x_ptr, x_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, False)
    # IEEE division: 1/||x|| of a norm near 1e38 is subnormal, an approximate reciprocal flushes it
    pre, div = _row_divisor(sx, ssx)
    tl.store(out_ptr + rows, tl.div_rn(pre, div), mask=rmask)


@triton.jit
def _normalize_fwd_kernel(x_ptr, y_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    sx, ssx, _, _, _ = _scaled_sums(x_ptr, x_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, False)
    pre, div = _row_divisor(sx, ssx)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < D)[None, :]
        off = rows[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + off, mask=m, other=0.0)
        y = (x.to(tl.float32) * pre[:, None]) / div[:, None]
        tl.store(y_ptr + off, y.to(x.dtype), mask=m)


@triton.jit
def _normalize_bwd_kernel(x_ptr, dy_ptr, dx_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    sx, ssx, sdy, _, xdy = _scaled_sums(x_ptr, dy_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, True)
    nrm = sx * tl.sqrt(ssx)
    pre, div = _row_divisor(sx, ssx)
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


@triton.jit
def _cosine_parts(a_ptr, b_ptr, rows, rmask, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """(cos, then per side the (pre, div) of _row_divisor, then ||a|| > eps, ||b|| > eps) per row,
    overflow-safe."""
    sa, ssa, sb, ssb, ab = _scaled_sums(a_ptr, b_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, True)
    pa, da = _row_divisor(sa, ssa)
    pb, db = _row_divisor(sb, ssb)
    cos = ab * ((sa * pa) / da) * ((sb * pb) / db)
    return cos, pa, da, pb, db, sa * tl.sqrt(ssa) > NORM_EPS, sb * tl.sqrt(ssb) > NORM_EPS


@triton.jit
def _cosine_fwd_kernel(a_ptr, b_ptr, out_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    cos = _cosine_parts(a_ptr, b_ptr, rows, rmask, D, BLOCK_R, BLOCK_D)[0]
    tl.store(out_ptr + rows, cos, mask=rmask)


@triton.jit
def _cosine_bwd_kernel(a_ptr, b_ptr, g_ptr, da_ptr, db_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """da = g (b^ - a^ cos [||a|| > eps]) / max(||a||, eps), and symmetrically db."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    cos, pa, da_, pb, db_, a_big, b_big = _cosine_parts(a_ptr, b_ptr, rows, rmask, D, BLOCK_R, BLOCK_D)
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


# GPU tile: rows of an unaligned D are loaded one element a lane along D, so a thread holds
# BLOCK_R / (row warps) whole rows' running sums; <= 1024 elements and <= 8 rows a program keep every
# kernel at <= 128 registers at 4 warps (no spills, two programs an SM; kernel_resources.csv)
ROW_TILE, ROW_MAX_R = 1024, 8
ROW_WARPS, ROW_STAGES = 4, 2


def row_tile(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) on a GPU: BLOCK_D one of 64..512 (longer rows loop), so the report can
    list every variant."""
    block_d = pow2(d, 64, 512)
    return min(ROW_MAX_R, ROW_TILE // block_d), block_d


def _blocks(n_rows: int, d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): whole small rows per program; the interpreter gets few, big programs."""
    if interpreting():
        block_d = pow2(d, 16, 1024)
        return pow2(n_rows, 1, max(1, (1 << 16) // block_d)), block_d
    return row_tile(d)


def _launch_rows(kernel, n_rows: int, d: int, *args) -> None:
    block_r, block_d = _blocks(n_rows, d)
    kernel[(cdiv(n_rows, block_r),)](*args, n_rows, d, BLOCK_R=block_r, BLOCK_D=block_d,
                                     num_warps=ROW_WARPS, num_stages=ROW_STAGES)


def row_inv_norms(x: torch.Tensor) -> torch.Tensor:
    """[N, D] (contiguous, fp16/bf16/fp32) -> [N] fp32 1 / max(||x_i||, NORM_EPS). Not differentiable."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _launch_rows(_inv_norm_kernel, x.shape[0], x.shape[1], x, out)
    return out


def normalize_backward(x: torch.Tensor, dy: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gradient through y = x / max(||x||, eps): x [N, D] any float, dy [N, D] (e.g. fp32) -> dx [N, D]."""
    x, dy = x.contiguous(), dy.contiguous()
    dx = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    _launch_rows(_normalize_bwd_kernel, x.shape[0], x.shape[1], x, dy, dx)
    return dx


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """The ``l2_normalize`` kernel: [N, D] fp16/bf16/fp32 -> [N, D] rows / max(||row||, NORM_EPS) in
    ``x.dtype`` (norm in fp32)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    _launch_rows(_normalize_fwd_kernel, x.shape[0], x.shape[1], x, y)
    return y


def l2_normalize_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The ``l2_normalize_backward`` kernel: d x [N, D] in ``x.dtype`` from the output's ``grad``."""
    return normalize_backward(x, grad, x.dtype)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The ``cosine_similarity`` kernel: [B, D], [B, D] (fp16/bf16/fp32) -> [B] fp32 cosine of the
    L2-normalised rows."""
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty(a.shape[0], dtype=torch.float32, device=a.device)
    _launch_rows(_cosine_fwd_kernel, a.shape[0], a.shape[1], a, b, out)
    return out


def cosine_similarity_grad(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cosine_similarity_backward`` kernel: (d a, d b) in the inputs' dtypes from ``grad`` [B]."""
    a, b, g = a.contiguous(), b.contiguous(), grad.contiguous()
    da, db = torch.empty_like(a), torch.empty_like(b)
    _launch_rows(_cosine_bwd_kernel, a.shape[0], a.shape[1], a, b, g, da, db)
    return da, db
