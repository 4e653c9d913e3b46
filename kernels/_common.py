"""What the Triton kernels share: interpreter detection, precision setting, sizes, the overflow-safe
row norms (used by l2_normalize, cosine_similarity and info_nce) and rounding to a storage dtype.

Precision of fp32 ``tl.dot`` (``input_precision``): "ieee" (exact, the default) or "tf32" (fast,
~1e-3 relative error in the logits), chosen by the environment variable ``GACD_FAST_TF32=1`` or at
run time with :func:`set_tf32`. Half-precision (fp16/bf16) tiles are unaffected.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from gacd_fast._numerics import NORM_EPS as _NORM_EPS

_tf32: bool | None = None
NORM_EPS = tl.constexpr(_NORM_EPS)  # F.normalize's eps, as a constexpr global the kernels can read


def interpreting() -> bool:
    """True when kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_tf32(enabled: bool | None) -> None:
    """Use TF32 for fp32 ``tl.dot`` tiles (True), IEEE fp32 (False), or follow $GACD_FAST_TF32 (None)."""
    global _tf32
    _tf32 = enabled


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for a ``tl.dot`` over tiles of ``dtype`` (ignored by Triton for fp16/bf16)."""
    tf32 = _tf32 if _tf32 is not None else os.environ.get("GACD_FAST_TF32", "0") == "1"
    return "tf32" if (tf32 and dtype == torch.float32 and not interpreting()) else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """bf16 ``tl.dot`` silently returns garbage in the interpreter: upcast its tiles to fp32 there."""
    return dtype == torch.bfloat16 and interpreting()


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """next_power_of_2(n) clamped to [lo, hi]."""
    v = max(lo, triton.next_power_of_2(max(1, int(n))))
    return min(v, hi) if hi is not None else v


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): sizes the split-K grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def elementwise_block(numel: int) -> int:
    # The interpreter's cost grows with the number of programs: use big blocks there.
    return pow2(numel, 16, 1 << 16) if interpreting() else 1024


# ---------------------------------------------------------------- elementwise: rounding to a dtype
@triton.jit
def round_to(v, dt: tl.constexpr):
    """Round fp32 ``v`` to ``dt`` (round-to-nearest-even, also under the interpreter) and back to fp32."""
    if dt == tl.float32:
        return v
    else:
        return v.to(dt, fp_downcast_rounding="rtne").to(tl.float32)


# ---------------------------------------------------------------- rows: overflow-safe norms
# F.normalize semantics: y = x / max(||x||, NORM_EPS) with the norm in fp32, computed as
# max|x| * sqrt(sum (x / max|x|)^2) so that finite rows of any magnitude (norms up to ~1e38) give
# finite results. A row kernel owns BLOCK_R rows and loops over D in BLOCK_D chunks.
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
def row_divisor(s, ss):
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
def scaled_sums(x_ptr, y_ptr, rows, rmask, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WITH_Y: tl.constexpr):
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
def _row_inv_norm_kernel(x_ptr, out_ptr, N, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    sx, ssx, _, _, _ = scaled_sums(x_ptr, x_ptr, rows, rmask, D, BLOCK_R, BLOCK_D, False)
    # IEEE division: 1/||x|| of a norm near 1e38 is subnormal, an approximate reciprocal flushes it
    pre, div = row_divisor(sx, ssx)
    tl.store(out_ptr + rows, tl.div_rn(pre, div), mask=rmask)


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


def row_blocks(n_rows: int, d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): whole small rows per program; the interpreter gets few, big programs."""
    if interpreting():
        block_d = pow2(d, 16, 1024)
        return pow2(n_rows, 1, max(1, (1 << 16) // block_d)), block_d
    return row_tile(d)


def launch_rows(kernel, n_rows: int, d: int, *args) -> None:
    block_r, block_d = row_blocks(n_rows, d)
    kernel[(cdiv(n_rows, block_r),)](*args, n_rows, d, BLOCK_R=block_r, BLOCK_D=block_d,
                                     num_warps=ROW_WARPS, num_stages=ROW_STAGES)


def row_inv_norms(x: torch.Tensor) -> torch.Tensor:
    """[N, D] (contiguous, fp16/bf16/fp32) -> [N] fp32 1 / max(||x_i||, NORM_EPS). Not differentiable."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    launch_rows(_row_inv_norm_kernel, x.shape[0], x.shape[1], x, out)
    return out
