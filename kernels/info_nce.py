"""Weighted-InfoNCE core: per-row loss l_i = LSE({s_pos_i} U {q_i.n/tau}) - s_pos_i, forward and
backward, without a B x K (or B x M x D) buffer.

Forward
    * inverse norms 1/max(||x||, 1e-12) of query, positive and bank rows are computed once per row
      (_common.row_inv_norms) and applied to the raw dot products inside the tiles: no normalised
      copy of the bank is made. normalize=False uses ones.
    * split-K: program (row block, chunk of negatives) keeps an online max/sum in base 2 (the scale
      1/tau * log2(e) folded into one multiplier, exp2) and writes one partial (m, l) per row; a
      combine kernel adds the positive logit and merges the partials in a fixed order into the
      fp32 LSE per row and the loss. Deterministic; the grid fills a GPU even for small B and huge K.
    * the stored LSE stays in base 2 (lse2 = LSE * log2(e), the ``lse`` output of the op, which only
      this backward reads), and the host computes t_pos once for forward and backward: every
      2^(t - lse2) is then taken between values rounded the same way, so a term that dominates by
      ~1e30 gets exactly 1 (converting lse between bases is off by many units at that magnitude).
    * shared bank: [BLOCK_M, BLOCK_D] x [BLOCK_D, BLOCK_N] tl.dot tiles, D looped in BLOCK_D chunks.
      neg_index [B, M]: one query row per program gathers its bank rows by index inside the kernel.
Backward (recomputes the score tiles from the stored LSE; no atomics, bitwise deterministic)
    * dq: row-parallel (a program owns BLOCK_M rows x BLOCK_DO output columns; split-K partials, if
      any, are summed in a fixed order), then the positive term and the chain rule through the
      normalisation (l2_normalize.l2_normalize_backward) on B x D tensors.
    * dnegatives, shared bank: column-parallel, one owner per bank row block, loops over the rows.
    * dnegatives, neg_index: the per-(row, slot) coefficients g_i P_ij / ||q_i|| [B, M] (fp32) are
      written by the dq kernel, (row, slot) pairs are stably sorted by bank row, and one program per
      bank-row block sums its contiguous segment in sorted order with a one-hot tl.dot. This keeps a
      [B, M] fp32 buffer (never [B, M, D]) and is deterministic.
Precision: fp32 accumulation always; fp32 tiles use input_precision "ieee" unless TF32 is enabled
(see kernels/_common.py: GACD_FAST_TF32=1 or set_tf32(True)). fp16 (and bf16 on a GPU) forward tiles
go to tl.dot in their own dtype; under the interpreter bf16 tiles are upcast to fp32 (its bf16 dot is
wrong). Backward dot products use fp32 tiles (the probabilities times 1/||n|| need fp32 range).
Sizes: one fixed config per (interpreter | GPU); no autotuning yet (it needs a GPU to validate).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._common import cdiv, dot_precision, interpreting, pow2, row_inv_norms, sm_count, upcast_dot
from gacd_fast._numerics import LN2, LOG2E

from .l2_normalize import l2_normalize_backward

# exp(x) = exp2(x * LOG2E): the kernels' scale is 1/tau * LOG2E (host floats here, constexprs in kernels)
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(LN2)
MAX_RESIDENT_D = 256  # up to this width a program keeps its whole q (or bank) tile for the whole loop


class _Config:
    """Launch settings. ``num_splits``: force the number of split-K chunks (None: automatic; tests
    set it to exercise the split/combine path under the interpreter)."""

    num_splits: Optional[int] = None


config = _Config()


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _finite_shift(m):
    """The exponent shift of an online sum whose running max is ``m``: m itself, 0 where m is
    +-inf (torch.logsumexp semantics: a +inf logit gives +inf, never inf - inf = NaN)."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _rescale(m_old, sh):
    """The factor 2^(shift(m_old) - sh) that moves a partial sum kept relative to 2^shift(m_old) onto
    the new shift ``sh``: 0 for an empty partial (m_old = -inf), whose sum is 0. Without the guard,
    a new max below -128 makes the factor 2^(-sh) overflow, and 0 * inf is NaN."""
    return tl.exp2(tl.where(m_old == float("-inf"), float("-inf"), _finite_shift(m_old) - sh))


@triton.jit
def _pow2_prescale(r):
    """An (up to rounding) power of two near the inverse norm ``r``: the resident tile is multiplied
    by it once, so raw dot products stay within ~2 ||other row|| (no overflow for huge rows) while
    the rows keep their own precision; the rest, r / prescale, is applied to the scores."""
    # log2/exp2 of a subnormal r (a row of norm above ~8.5e37) may flush to -inf on a GPU: clamp at
    # the smallest normal float32 (the rest r / prescale then stays below 1)
    return tl.exp2(tl.ceil(tl.log2(tl.maximum(r, 1.1754943508222875e-38))))


@triton.jit
def _load_rows(ptr, r0, nrows, D, dd, PRESCALE, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
               DTYPE: tl.constexpr):
    """Rows [r0, r0 + ROWS) x columns dd of a [*, D] matrix (zero-padded), times the per-row
    ``PRESCALE`` [ROWS] fp32, as a [ROWS, BLOCK_D] tile of ``DTYPE``. r0 is int64 (big banks),
    the in-tile offsets int32."""
    rr = tl.arange(0, ROWS)
    t = tl.load(ptr + r0 * D + rr[:, None] * D + dd[None, :], mask=(rr < nrows)[:, None] & (dd < D)[None, :],
                other=0.0)
    return (t.to(tl.float32) * PRESCALE[:, None]).to(DTYPE)


@triton.jit
def _load_cols(ptr, c0, ncols, D, dd, DTYPE: tl.constexpr, COLS: tl.constexpr):
    """Bank rows [c0, c0 + ncols) as the transposed tile [BLOCK_D, COLS] of ``DTYPE``, zero-padded."""
    cc = tl.arange(0, COLS)
    t = tl.load(ptr + c0 * D + cc[None, :] * D + dd[:, None], mask=(cc < ncols)[None, :] & (dd < D)[:, None],
                other=0.0)
    return t.to(DTYPE)


@triton.jit
def _bank_scores(qt, q_ptr, row0, nrows, pq, n_ptr, k0, ncols, D, DOT_T: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Raw scores (pq q) . n [BLOCK_M, BLOCK_N] fp32 (|s| <~ 2 ||n||: multiply by 1/||n|| before any
    other factor, so huge rows cannot overflow) and the bank tile [BLOCK_D, BLOCK_N] (valid when
    ``RESIDENT``: the q tile ``qt`` holds all of D, loaded once per program; otherwise D is looped)."""
    dd = tl.arange(0, BLOCK_D)
    if RESIDENT:
        nt = _load_cols(n_ptr, k0, ncols, D, dd, DOT_T, BLOCK_N)
        s = tl.dot(qt, nt, input_precision=DOT_PREC)
    else:
        nt = tl.zeros([BLOCK_D, BLOCK_N], dtype=DOT_T)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            qc = _load_rows(q_ptr, row0, nrows, D, d0 + dd, pq, BLOCK_M, BLOCK_D, DOT_T)
            nc = _load_cols(n_ptr, k0, ncols, D, d0 + dd, DOT_T, BLOCK_N)
            s = tl.dot(qc, nc, s, input_precision=DOT_PREC)
    return s, nt


@triton.jit
def _info_nce_fwd_bank_kernel(q_ptr, n_ptr, rq_ptr, rn_ptr, m_ptr, l_ptr, acc_ptr, B, K, D, chunk, scale2,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
                     WITH_DQ: tl.constexpr, DOT_T: tl.constexpr, DOT_PREC: tl.constexpr, ACC_T: tl.constexpr,
                     ACC_PREC: tl.constexpr):
    """Split-K partials of rows [row0, row0 + BLOCK_M) over bank rows [k_start, k_end): the online
    max m and sum l (base 2, l relative to 2^shift(m)) and, with ``WITH_DQ`` (bank needs no grad,
    D <= BLOCK_D), acc = sum_j 2^(t_j - shift(m)) n_j / ||n_j|| [BLOCK_M, D] (the dq numerator)."""
    pid_s = tl.program_id(1).to(tl.int64)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rr = tl.arange(0, BLOCK_M)
    nrows = B - row0
    rmask = rr < nrows
    dd = tl.arange(0, BLOCK_D)
    rq = tl.load(rq_ptr + row0 + rr, mask=rmask, other=1.0)
    pq = _pow2_prescale(rq)
    rowf = rq / pq * scale2  # the rest of 1/||q||, times log2(e)/tau: one multiplier per row
    qt = tl.zeros([BLOCK_M, BLOCK_D], dtype=DOT_T)
    if RESIDENT:
        qt = _load_rows(q_ptr, row0, nrows, D, dd, pq, BLOCK_M, BLOCK_D, DOT_T)
    k_start = pid_s * chunk
    k_end = tl.minimum(k_start + chunk, K)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_N):
        ncols = k_end - k0
        s, nt = _bank_scores(qt, q_ptr, row0, nrows, pq, n_ptr, k0, ncols, D, DOT_T, BLOCK_M, BLOCK_N, BLOCK_D,
                             RESIDENT, DOT_PREC)
        kk = tl.arange(0, BLOCK_N)
        rn = tl.load(rn_ptr + k0 + kk, mask=kk < ncols, other=0.0)
        t = tl.where((kk < ncols)[None, :], s * rn[None, :] * rowf[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(t, axis=1))
        sh = _finite_shift(m_new)
        alpha = _rescale(m, sh)
        e = tl.exp2(t - sh[:, None])
        l = l * alpha + tl.sum(e, axis=1)
        if WITH_DQ:
            acc = tl.dot((e * rn[None, :]).to(ACC_T), tl.trans(nt).to(ACC_T), acc * alpha[:, None],
                         input_precision=ACC_PREC)
        m = m_new
    tl.store(m_ptr + pid_s * B + row0 + rr, m, mask=rmask)
    tl.store(l_ptr + pid_s * B + row0 + rr, l, mask=rmask)
    if WITH_DQ:
        tl.store(acc_ptr + (pid_s * B + row0) * D + rr[:, None] * D + dd[None, :], acc,
                 mask=rmask[:, None] & (dd < D)[None, :])


@triton.jit
def _gather_tile(n_ptr, nid, jmask, D, dd):
    """Gathered bank rows n[nid] x columns dd [BLOCK_N, BLOCK_D] in fp32 (zero-padded)."""
    t = tl.load(n_ptr + nid[:, None] * D + dd[None, :], mask=jmask[:, None] & (dd < D)[None, :], other=0.0)
    return t.to(tl.float32)


@triton.jit
def _gather_scores(qv, q_ptr, row, pq, n_ptr, nid, jmask, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   RESIDENT: tl.constexpr):
    """Raw scores (pq q_row) . n[nid] [BLOCK_N] fp32 and the gathered tile (valid when ``RESIDENT``:
    ``qv`` [BLOCK_D] holds all of the query row)."""
    dd = tl.arange(0, BLOCK_D)
    if RESIDENT:
        nt = _gather_tile(n_ptr, nid, jmask, D, dd)
        s = tl.sum(nt * qv[None, :], axis=1)
    else:
        nt = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            qc = tl.load(q_ptr + row * D + d0 + dd, mask=d0 + dd < D, other=0.0).to(tl.float32) * pq
            s += tl.sum(_gather_tile(n_ptr, nid, jmask, D, d0 + dd) * qc[None, :], axis=1)
    return s, nt


@triton.jit
def _info_nce_fwd_gather_kernel(q_ptr, n_ptr, idx_ptr, rq_ptr, rn_ptr, m_ptr, l_ptr, acc_ptr, B, M, D, chunk, scale2,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr, WITH_DQ: tl.constexpr):
    """As _info_nce_fwd_bank_kernel for one query row against its gathered rows n[neg_index[row, j]]."""
    row = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    rq = tl.load(rq_ptr + row)
    pq = _pow2_prescale(rq)
    rowf = rq / pq * scale2
    qv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if RESIDENT:
        qv = tl.load(q_ptr + row * D + dd, mask=dd < D, other=0.0).to(tl.float32) * pq
    j_start = pid_s * chunk
    j_end = tl.minimum(j_start + chunk, M)
    m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    l = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        jmask = js < j_end
        nid = tl.load(idx_ptr + row * M + js, mask=jmask, other=0).to(tl.int64)
        s, nt = _gather_scores(qv, q_ptr, row, pq, n_ptr, nid, jmask, D, BLOCK_N, BLOCK_D, RESIDENT)
        rn = tl.load(rn_ptr + nid, mask=jmask, other=0.0)
        t = tl.where(jmask, s * rn * rowf, float("-inf"))
        m_new = tl.maximum(m, tl.max(t, axis=0))
        sh = _finite_shift(m_new)
        alpha = _rescale(m, sh)
        e = tl.exp2(t - sh)
        l = l * alpha + tl.sum(e, axis=0)
        if WITH_DQ:
            acc = acc * alpha + tl.sum((e * rn)[:, None] * nt, axis=0)
        m = m_new
    tl.store(m_ptr + pid_s * B + row, m)
    tl.store(l_ptr + pid_s * B + row, l)
    if WITH_DQ:
        tl.store(acc_ptr + (pid_s * B + row) * D + dd, acc, mask=dd < D)


@triton.jit
def _info_nce_fwd_combine_kernel(t_ptr, m_ptr, l_ptr, loss_ptr, lse_ptr, B, S, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Adds the positive logit t_pos (base 2, from the host) to the split partials (fixed order) ->
    loss (natural log) and lse2 (base 2), fp32."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    t_pos = tl.load(t_ptr + rows, mask=rmask, other=0.0)
    m = t_pos
    l = tl.exp2(t_pos - _finite_shift(t_pos))
    for s0 in range(0, S, BLOCK_S):  # the split partials, merged in a fixed order
        sp = s0 + tl.arange(0, BLOCK_S)
        pm = rmask[:, None] & (sp < S)[None, :]
        off = sp[None, :].to(tl.int64) * B + rows[:, None]
        ms = tl.load(m_ptr + off, mask=pm, other=float("-inf"))
        ls = tl.load(l_ptr + off, mask=pm, other=0.0)
        m_new = tl.maximum(m, tl.max(ms, axis=1))
        sh = _finite_shift(m_new)
        l = l * _rescale(m, sh) + tl.sum(tl.where(pm, ls * _rescale(ms, sh[:, None]), 0.0), axis=1)
        m = m_new
    lse2 = _finite_shift(m) + tl.log2(l)
    tl.store(lse_ptr + rows, lse2, mask=rmask)
    tl.store(loss_ptr + rows, (lse2 - t_pos) * LN2_C, mask=rmask)


@triton.jit
def _info_nce_bwd_dq_bank_kernel(q_ptr, n_ptr, rq_ptr, rn_ptr, lse_ptr, g_ptr, out_ptr, B, K, D, chunk, scale2, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
                    DOT_T: tl.constexpr, DOT_PREC: tl.constexpr, ACC_T: tl.constexpr, ACC_PREC: tl.constexpr):
    """out[split, rows, dcols] = sum_j g_i P_ij n_j / ||n_j|| / tau over this split's bank rows;
    dcols = all of D (``RESIDENT``) or the program's BLOCK_D slice (scores recomputed per slice)."""
    pid_d = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    rr = tl.arange(0, BLOCK_M)
    nrows = B - row0
    rmask = rr < nrows
    dd = tl.arange(0, BLOCK_D)
    rq = tl.load(rq_ptr + row0 + rr, mask=rmask, other=1.0)
    pq = _pow2_prescale(rq)
    rowf = rq / pq * scale2
    lse2 = tl.load(lse_ptr + row0 + rr, mask=rmask, other=0.0)
    gs = tl.load(g_ptr + row0 + rr, mask=rmask, other=0.0) * scale
    qt = tl.zeros([BLOCK_M, BLOCK_D], dtype=DOT_T)
    if RESIDENT:
        qt = _load_rows(q_ptr, row0, nrows, D, dd, pq, BLOCK_M, BLOCK_D, DOT_T)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_start = pid_s * chunk
    k_end = tl.minimum(k_start + chunk, K)
    for k0 in range(k_start, k_end, BLOCK_N):
        ncols = k_end - k0
        s, nt = _bank_scores(qt, q_ptr, row0, nrows, pq, n_ptr, k0, ncols, D, DOT_T, BLOCK_M, BLOCK_N, BLOCK_D,
                             RESIDENT, DOT_PREC)
        kk = tl.arange(0, BLOCK_N)
        rn = tl.load(rn_ptr + k0 + kk, mask=kk < ncols, other=0.0)
        p = tl.exp2(s * rn[None, :] * rowf[:, None] - lse2[:, None])
        w = tl.where((kk < ncols)[None, :], p * rn[None, :], 0.0)
        if not RESIDENT:  # the output slice of the bank tile
            nt = _load_cols(n_ptr, k0, ncols, D, pid_d * BLOCK_D + dd, DOT_T, BLOCK_N)
        acc = tl.dot(w.to(ACC_T), tl.trans(nt).to(ACC_T), acc, input_precision=ACC_PREC)
    do = pid_d * BLOCK_D + dd
    acc = acc * gs[:, None]
    tl.store(out_ptr + (pid_s * B + row0) * D + rr[:, None] * D + do[None, :], acc,
             mask=rmask[:, None] & (do < D)[None, :])


@triton.jit
def _info_nce_bwd_dq_gather_kernel(q_ptr, n_ptr, idx_ptr, rq_ptr, rn_ptr, lse_ptr, g_ptr, out_ptr, coef_ptr, B, M, D, chunk,
                      scale2, scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
                      WRITE_DQ: tl.constexpr, WRITE_COEF: tl.constexpr):
    """dq partials for one row (as _info_nce_bwd_dq_bank_kernel); optionally coef[row, j] = g P_ij / ||q|| / tau."""
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    rq = tl.load(rq_ptr + row)
    pq = _pow2_prescale(rq)
    rowf = rq / pq * scale2
    lse2 = tl.load(lse_ptr + row)
    gs = tl.load(g_ptr + row) * scale
    qv = tl.zeros([BLOCK_D], dtype=tl.float32)
    if RESIDENT:
        qv = tl.load(q_ptr + row * D + dd, mask=dd < D, other=0.0).to(tl.float32) * pq
    do = pid_d * BLOCK_D + dd
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    j_start = pid_s * chunk
    j_end = tl.minimum(j_start + chunk, M)
    for j0 in range(j_start, j_end, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        jmask = js < j_end
        nid = tl.load(idx_ptr + row * M + js, mask=jmask, other=0).to(tl.int64)
        s, nt = _gather_scores(qv, q_ptr, row, pq, n_ptr, nid, jmask, D, BLOCK_N, BLOCK_D, RESIDENT)
        rn = tl.load(rn_ptr + nid, mask=jmask, other=0.0)
        p = tl.where(jmask, tl.exp2(s * rn * rowf - lse2), 0.0)
        if WRITE_DQ:
            if not RESIDENT:
                nt = _gather_tile(n_ptr, nid, jmask, D, do)
            acc += tl.sum((p * rn)[:, None] * nt, axis=0)
        if WRITE_COEF:
            if pid_d == 0:
                tl.store(coef_ptr + row * M + js, p * gs * rq, mask=jmask)
    if WRITE_DQ:
        tl.store(out_ptr + (pid_s * B + row) * D + do, acc * gs, mask=do < D)


@triton.jit
def _info_nce_bwd_dn_bank_kernel(q_ptr, n_ptr, rq_ptr, rn_ptr, lse_ptr, g_ptr, out_ptr, B, K, D, scale2, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, RESIDENT: tl.constexpr,
                    DOT_T: tl.constexpr, DOT_PREC: tl.constexpr, ACC_T: tl.constexpr, ACC_PREC: tl.constexpr):
    """out[cols, dcols] = sum_i g_i P_ij q_i / ||q_i|| / tau: one owner per bank row block, whose
    (prescaled) bank tile stays resident while the query row blocks stream past (D <= BLOCK_D), or
    D looped with the program's BLOCK_D output slice."""
    pid_d = tl.program_id(1).to(tl.int64)
    c0 = tl.program_id(0).to(tl.int64) * BLOCK_N
    cc = tl.arange(0, BLOCK_N)
    ncols = K - c0
    cmask = cc < ncols
    dd = tl.arange(0, BLOCK_D)
    rn = tl.load(rn_ptr + c0 + cc, mask=cmask, other=1.0)
    pn = _pow2_prescale(rn)
    colf = rn / pn * scale2
    nt = tl.zeros([BLOCK_N, BLOCK_D], dtype=DOT_T)
    if RESIDENT:
        nt = _load_rows(n_ptr, c0, ncols, D, dd, pn, BLOCK_N, BLOCK_D, DOT_T)
    do = pid_d * BLOCK_D + dd
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i0 in range(0, B, BLOCK_M):
        nrows = B - i0
        rr = tl.arange(0, BLOCK_M)
        rmask = rr < nrows
        # transposed scores (pn n) . q [BLOCK_N, BLOCK_M], the same call with the roles swapped
        st, qt = _bank_scores(nt, n_ptr, c0, ncols, pn, q_ptr, i0, nrows, D, DOT_T, BLOCK_N, BLOCK_M, BLOCK_D,
                              RESIDENT, DOT_PREC)
        rq = tl.load(rq_ptr + i0 + rr, mask=rmask, other=0.0)
        lse2 = tl.load(lse_ptr + i0 + rr, mask=rmask, other=0.0)
        gs = tl.load(g_ptr + i0 + rr, mask=rmask, other=0.0) * scale
        p = tl.exp2(st * rq[None, :] * colf[:, None] - lse2[None, :])
        w = tl.where(cmask[:, None] & rmask[None, :], p * (gs * rq)[None, :], 0.0)
        if not RESIDENT:
            qt = _load_cols(q_ptr, i0, nrows, D, do, DOT_T, BLOCK_M)
        acc = tl.dot(w.to(ACC_T), tl.trans(qt).to(ACC_T), acc, input_precision=ACC_PREC)
    tl.store(out_ptr + c0 * D + cc[:, None] * D + do[None, :], acc, mask=cmask[:, None] & (do < D)[None, :])


@triton.jit
def _info_nce_bwd_dn_segment_kernel(q_ptr, rows_ptr, qi_ptr, coef_ptr, bounds_ptr, out_ptr, K, D,
                       BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, ACC_PREC: tl.constexpr):
    """out[r, dcols] = sum over sorted entries e with row r of coef_e * q[qi_e]: a program owns bank
    rows [j0, j0 + BLOCK_N), whose entries are contiguous in the stable sort, visited in order."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    j0 = pid_n * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    do = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    domask = do < D
    e_start = tl.load(bounds_ptr + pid_n)
    e_end = tl.load(bounds_ptr + pid_n + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for e0 in range(e_start, e_end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        emask = es < e_end
        r = tl.load(rows_ptr + es, mask=emask, other=-1)
        qi = tl.load(qi_ptr + es, mask=emask, other=0)
        c = tl.load(coef_ptr + es, mask=emask, other=0.0)
        hit = (r[None, :] == cols[:, None]) & emask[None, :]
        w = tl.where(hit, c[None, :], 0.0)  # [BLOCK_N, BLOCK_E] one-hot rows scaled by coef
        qt = tl.load(q_ptr + qi[:, None] * D + do[None, :], mask=emask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(w, qt.to(tl.float32), acc, input_precision=ACC_PREC)
    tl.store(out_ptr + cols[:, None] * D + do[None, :], acc, mask=(cols < K)[:, None] & domask[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
class Tile(NamedTuple):
    """One launch configuration: tile sizes, warps and software-pipelining stages."""

    block_m: int  # query rows per tile (bank kernels), gathered rows per tile (gather kernels: block_n)
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


# GPU tiles per (kernel, dtype group, BLOCK_D) for D <= MAX_RESIDENT_D, and per (kernel, dtype group)
# for looped D; from the sm_90 compile report (benchmarks/kernel_report.py): no spills, and <= 128
# registers a thread where the tile allows two programs per SM. "half" = fp16/bf16 tiles, "f32" =
# fp32 (ieee or tf32).
_GPU_TILES: dict[tuple[str, str], dict[int, Tile]] = {
    ("fwd", "half"): {16: Tile(64, 64, 16, 4, 3), 32: Tile(64, 64, 32, 4, 3), 64: Tile(64, 32, 64, 8, 2),
                      128: Tile(64, 32, 128, 8, 2), 256: Tile(64, 32, 256, 8, 2)},
    # 256: a 32-column bank tile next to the resident q and the dq accumulator spills (fp32 ieee)
    ("fwd", "f32"): {16: Tile(32, 32, 16, 4, 2), 32: Tile(32, 32, 32, 4, 2), 64: Tile(32, 32, 64, 8, 2),
                     128: Tile(32, 32, 128, 8, 2), 256: Tile(32, 16, 256, 8, 2)},
    ("dq", "half"): {16: Tile(64, 64, 16, 4, 3), 32: Tile(64, 64, 32, 4, 3), 64: Tile(64, 32, 64, 8, 2),
                     128: Tile(64, 32, 128, 8, 2), 256: Tile(64, 32, 256, 8, 2)},
    ("dq", "f32"): {16: Tile(32, 32, 16, 4, 2), 32: Tile(32, 32, 32, 4, 2), 64: Tile(32, 32, 64, 8, 2),
                    128: Tile(32, 32, 128, 8, 2), 256: Tile(32, 32, 256, 8, 2)},
    ("dn", "half"): {16: Tile(64, 64, 16, 4, 3), 32: Tile(64, 64, 32, 4, 3), 64: Tile(32, 64, 64, 8, 2),
                     128: Tile(32, 64, 128, 8, 2), 256: Tile(32, 64, 256, 8, 2)},
    # 64: one stage (the second stage's buffers cost the registers that spilled)
    ("dn", "f32"): {16: Tile(32, 32, 16, 4, 2), 32: Tile(32, 32, 32, 4, 2), 64: Tile(32, 32, 64, 8, 1),
                    128: Tile(32, 32, 128, 8, 2), 256: Tile(32, 32, 256, 8, 2)},
    # <= 2048 gathered elements a tile (each gathered row has its own pointer): <= 128 registers
    ("gather", "any"): {16: Tile(1, 64, 16, 4, 2), 32: Tile(1, 64, 32, 4, 2), 64: Tile(1, 32, 64, 4, 2),
                        128: Tile(1, 16, 128, 4, 2), 256: Tile(1, 16, 256, 4, 2)},
}
LOOPED_BLOCK_D = 128  # D > MAX_RESIDENT_D: D is looped in chunks of this width (and dq/dn output slices)
# looped D: the half-precision dq/dn tiles are 32 x 32 (64-row/column tiles spill there)
_LOOPED_TILES: dict[tuple[str, str], Tile] = {
    ("fwd", "half"): Tile(64, 32, LOOPED_BLOCK_D, 8, 2), ("fwd", "f32"): Tile(32, 32, LOOPED_BLOCK_D, 8, 2),
    ("dq", "half"): Tile(32, 32, LOOPED_BLOCK_D, 8, 2), ("dq", "f32"): Tile(32, 32, LOOPED_BLOCK_D, 8, 2),
    ("dn", "half"): Tile(32, 32, LOOPED_BLOCK_D, 8, 2), ("dn", "f32"): Tile(32, 32, LOOPED_BLOCK_D, 8, 2),
    ("gather", "any"): Tile(1, 16, LOOPED_BLOCK_D, 4, 2),
}


def block_d_for(D: int) -> int:
    """BLOCK_D for width D: D (as a power of two >= 16) up to MAX_RESIDENT_D, else the looped chunk."""
    return pow2(D, 16) if D <= MAX_RESIDENT_D else LOOPED_BLOCK_D


def gpu_tile(kind: str, dtype: torch.dtype, D: int) -> Tile:
    """The GPU launch configuration of ``kind`` ("fwd", "dq", "dn", "gather") for ``dtype`` and D."""
    group = "any" if kind == "gather" else ("f32" if dtype == torch.float32 else "half")
    if D > MAX_RESIDENT_D:
        return _LOOPED_TILES[(kind, group)]
    return _GPU_TILES[(kind, group)][block_d_for(D)]


def _tile(kind: str, dtype: torch.dtype, B: int, D: int) -> Tile:
    if interpreting():  # few, big programs: the interpreter pays per program and per loop trip
        if kind == "gather":
            return Tile(1, 1024, pow2(D, 16, MAX_RESIDENT_D), 1, 1)
        return Tile(pow2(B, 16, 64), 512, pow2(D, 16, MAX_RESIDENT_D), 1, 1)
    return gpu_tile(kind, dtype, D)


def _launch(t: Tile) -> dict:
    return dict(num_warps=t.num_warps, num_stages=t.num_stages)


def dot_types(dtype: torch.dtype) -> dict:
    """Constexprs of the bank kernels for input ``dtype``: the score dot's operand type and precision,
    and the accumulation dot's (P @ bank or P^T @ q). fp16 accumulation dots run in fp32 tiles with
    TF32 on a GPU (tensor cores; P / ||n|| can exceed fp16's range, not fp32's); bf16 stays bf16."""
    f32 = tl.float32
    if dtype == torch.float32 or upcast_dot(dtype):
        prec = dot_precision(torch.float32)
        return dict(DOT_T=f32, DOT_PREC=prec, ACC_T=f32, ACC_PREC=prec)
    native = tl.float16 if dtype == torch.float16 else tl.bfloat16
    if dtype == torch.float16:
        return dict(DOT_T=native, DOT_PREC="ieee", ACC_T=f32, ACC_PREC="ieee" if interpreting() else "tf32")
    return dict(DOT_T=native, DOT_PREC="ieee", ACC_T=native, ACC_PREC="ieee")


def combine_tile(B: int, S: int) -> Tile:
    """Launch of _info_nce_fwd_combine_kernel (block_n = BLOCK_S, split partials merged per step; no block_d)."""
    if interpreting():
        return Tile(pow2(B, 1, 64), pow2(S, 2, 64), 1, 1, 1)
    return Tile(64, 16, 1, 4, 2)


def _splits(row_programs: int, total: int, block: int, device: torch.device) -> tuple[int, int]:
    """(number of split-K chunks, chunk length, a multiple of ``block``) over ``total`` negatives."""
    if config.num_splits is not None:
        want = config.num_splits
    elif interpreting():
        want = 1
    else:  # enough (row block, chunk) programs for ~4 waves
        want = cdiv(4 * sm_count(device), row_programs)
    want = max(1, min(want, cdiv(total, block), 4096))
    chunk = cdiv(cdiv(total, want), block) * block
    return cdiv(total, chunk), chunk


def _norms(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    if normalize:
        return row_inv_norms(x)
    return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)


def _finite_shift_t(m: torch.Tensor) -> torch.Tensor:
    """Host twin of the kernels' _finite_shift (the exponent the partial sums are relative to)."""
    return torch.where(m.isinf(), torch.zeros_like(m), m)


def _forward(q, p, n, idx, scale, normalize, compute_dq):
    """-> loss [B], lse [B] (fp32), and with ``compute_dq`` dq_neg = sum_j P_ij n^_j / tau [B, D] fp32
    (the bank's part of d loss_i / d q^_i before the row weight), else an empty tensor."""
    B, D = q.shape
    rq, rp, rn = _norms(q, normalize), _norms(p, normalize), _norms(n, normalize)
    scale2 = scale * LOG2E
    resident = D <= MAX_RESIDENT_D
    with_dq = compute_dq and resident  # wider rows: dq by the backward kernel, still in forward
    if idx is None:
        K = n.shape[0]
        t = _tile("fwd", q.dtype, B, D)
        S, chunk = _splits(cdiv(B, t.block_m), K, t.block_n, q.device)
        grid = (cdiv(B, t.block_m), S)
    else:
        K = idx.shape[1]
        t = _tile("gather", q.dtype, B, D)
        S, chunk = _splits(B, K, t.block_n, q.device)
        grid = (B, S)
    m_part = torch.empty((S, B), dtype=torch.float32, device=q.device)
    l_part = torch.empty_like(m_part)
    acc = torch.empty((S, B, D) if with_dq else (1,), dtype=torch.float32, device=q.device)
    if idx is None:
        _info_nce_fwd_bank_kernel[grid](
            q, n, rq, rn, m_part, l_part, acc, B, K, D, chunk, scale2,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, RESIDENT=resident, WITH_DQ=with_dq,
            **dot_types(q.dtype), **_launch(t),
        )
    else:
        _info_nce_fwd_gather_kernel[grid](
            q, n, idx, rq, rn, m_part, l_part, acc, B, K, D, chunk, scale2,
            BLOCK_N=t.block_n, BLOCK_D=t.block_d, RESIDENT=resident, WITH_DQ=with_dq, **_launch(t),
        )
    loss = torch.empty(B, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(loss)
    c = combine_tile(B, S)
    _info_nce_fwd_combine_kernel[(cdiv(B, c.block_m),)](
        _positive_logits2(q, p, rq, rp, scale2), m_part, l_part, loss, lse, B, S,
        BLOCK_M=c.block_m, BLOCK_S=c.block_n, **_launch(c),
    )
    dq_neg = torch.empty(0, dtype=torch.float32, device=q.device)
    if with_dq:  # partials relative to 2^shift(m_s): merge in a fixed order, normalised by the LSE
        w = torch.exp2(_finite_shift_t(m_part) - lse[None, :])
        w = torch.where(m_part == float("-inf"), torch.zeros_like(w), w)  # an empty partial: 0, never 0 * inf
        dq_neg = (w[:, :, None] * acc).sum(0) * scale
    elif compute_dq:
        dq_neg, _ = _dq_neg(q, n, idx, rq, rn, lse, torch.ones_like(lse), scale, want_coef=False)
    return loss, lse, dq_neg


def _contig(*ts):
    return tuple(None if t is None else t.contiguous() for t in ts)


def info_nce_forward(query, positive, negatives, neg_index, temperature, normalize, compute_dq):
    """The ``info_nce_forward`` kernel (schema and meaning: gacd_fast/ops/info_nce.py).

    query, positive [B, D] and negatives [K, D] in one of fp16/bf16/fp32; neg_index None or
    int32/int64 [B, M]. Returns loss [B], lse [B] (fp32) and dq_neg [B, D] fp32 (empty unless
    ``compute_dq``).
    """
    q, p, n, idx = _contig(query, positive, negatives, neg_index)
    return _forward(q, p, n, idx, 1.0 / temperature, normalize, compute_dq)


def _dq_neg(q, n, idx, rq, rn, lse, g, scale, want_coef: bool, want_dq: bool = True):
    """sum_j g_i P_ij n^_j / tau [B, D] fp32 (None if not ``want_dq``), and the gather-mode coef."""
    B, D = q.shape
    scale2 = scale * LOG2E
    resident = D <= MAX_RESIDENT_D
    coef = None
    if idx is None:
        K = n.shape[0]
        t = _tile("dq", q.dtype, B, D)
        nd = cdiv(D, t.block_d)
        S, chunk = _splits(cdiv(B, t.block_m) * nd, K, t.block_n, q.device)
        part = torch.empty((S, B, D), dtype=torch.float32, device=q.device)
        _info_nce_bwd_dq_bank_kernel[(cdiv(B, t.block_m), nd, S)](
            q, n, rq, rn, lse, g, part, B, K, D, chunk, scale2, scale,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, RESIDENT=resident,
            **dot_types(q.dtype), **_launch(t),
        )
    else:
        M = idx.shape[1]
        t = _tile("gather", q.dtype, B, D)
        nd = cdiv(D, t.block_d)
        S, chunk = _splits(B * nd, M, t.block_n, q.device)
        if want_coef:
            S, chunk = 1, cdiv(M, t.block_n) * t.block_n  # coef written once per (row, slot): one chunk a row
        part = torch.empty((S, B, D) if want_dq else (1,), dtype=torch.float32, device=q.device)
        coef = torch.empty((B, M), dtype=torch.float32, device=q.device) if want_coef else part
        _info_nce_bwd_dq_gather_kernel[(B, nd if want_dq else 1, S)](
            q, n, idx, rq, rn, lse, g, part, coef, B, M, D, chunk, scale2, scale,
            BLOCK_N=t.block_n, BLOCK_D=t.block_d, RESIDENT=resident, WRITE_DQ=want_dq, WRITE_COEF=want_coef,
            **_launch(t),
        )
        if not want_coef:
            coef = None
        if not want_dq:
            return None, coef
    dq = part[0] if part.shape[0] == 1 else part.sum(0)  # fixed-order merge of the split partials
    return dq, coef


def _unit_rows(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return x.float() * r[:, None]


def _positive_logits2(q, p, rq, rp, scale2: float) -> torch.Tensor:
    """t_pos = s_pos * log2(e) [B] fp32. The forward and the backward both take it from here, so the
    backward's t_pos - lse2 is bitwise the forward's, however large |t_pos| is."""
    return (_unit_rows(q, rq) * _unit_rows(p, rp)).sum(1) * scale2


def _grad_query_positive(g, q, p, n, idx, lse, dq_neg, scale, normalize, need_q):
    """(dq or None, dp): the positive column's terms plus, for dq, the bank's part (``dq_neg`` from
    the forward when given, else recomputed from the stored LSE)."""
    rq, rp = _norms(q, normalize), _norms(p, normalize)
    qh, ph = _unit_rows(q, rq), _unit_rows(p, rp)  # B x D normalised rows (not the bank)
    # positive column: dl/ds_pos = P_pos - 1 with P_pos = 2^(t_pos - lse2)
    t_pos = _positive_logits2(q, p, rq, rp, scale * LOG2E)
    cpos = (g * scale * torch.expm1((t_pos - lse) * LN2))[:, None]
    dph = cpos * qh
    dp = l2_normalize_backward(dph, p) if normalize else dph.to(p.dtype)
    if not need_q:
        return None, dp
    if dq_neg is not None and dq_neg.numel() > 0:
        dqh = g[:, None] * dq_neg
    else:
        rn = _norms(n, normalize)
        dqh, _ = _dq_neg(q, n, idx, rq, rn, lse, g, scale, want_coef=False)
    dqh = dqh + cpos * ph
    dq = l2_normalize_backward(dqh, q) if normalize else dqh.to(q.dtype)
    return dq, dp


def _grad_negatives(g, q, n, idx, lse, scale, normalize):
    """d negatives [K, D] in the bank's dtype: one owner per bank row (block), no atomics."""
    B, D = q.shape
    K = n.shape[0]
    rq, rn = _norms(q, normalize), _norms(n, normalize)
    dnh = torch.empty((K, D), dtype=torch.float32, device=q.device)
    if idx is None:
        t = _tile("dn", q.dtype, B, D)
        if interpreting():
            t = t._replace(block_n=min(t.block_n, 128))
        _info_nce_bwd_dn_bank_kernel[(cdiv(K, t.block_n), cdiv(D, t.block_d))](
            q, n, rq, rn, lse, g, dnh, B, K, D, scale * LOG2E, scale,
            BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_D=t.block_d, RESIDENT=D <= MAX_RESIDENT_D,
            **dot_types(q.dtype), **_launch(t),
        )
    else:
        M = idx.shape[1]
        _, coef = _dq_neg(q, n, idx, rq, rn, lse, g, scale, want_coef=True, want_dq=False)
        flat = idx.reshape(-1).to(torch.int64)
        srows, order = torch.sort(flat, stable=True)  # deterministic order of the contributions
        qi = order // M
        scoef = coef.reshape(-1)[order]
        t = segment_tile(D)
        nblk = cdiv(K, t.block_n)
        edges = torch.arange(0, nblk + 1, device=q.device, dtype=torch.int64) * t.block_n
        bounds = torch.searchsorted(srows, edges)
        _info_nce_bwd_dn_segment_kernel[(nblk, cdiv(D, t.block_d))](
            q, srows, qi, scoef, bounds, dnh, K, D,
            BLOCK_N=t.block_n, BLOCK_E=t.block_m, BLOCK_D=t.block_d, ACC_PREC=dot_types(q.dtype)["ACC_PREC"]
            if q.dtype != torch.bfloat16 else dot_precision(torch.float32), **_launch(t),
        )
    return l2_normalize_backward(dnh, n) if normalize else dnh.to(n.dtype)


def segment_tile(D: int) -> Tile:
    """Launch of _info_nce_bwd_dn_segment_kernel (block_m = BLOCK_E, entries per step; block_d = output slice)."""
    if interpreting():
        return Tile(256, 64, pow2(D, 16, MAX_RESIDENT_D), 1, 1)
    bd = pow2(D, 16, 128)
    return Tile(32, 32, bd, 4, 2)


def info_nce_backward(grad, query, positive, negatives, neg_index, lse, dq_neg, temperature, normalize,
                      need_query, need_positive, need_negatives):
    """The ``info_nce_backward`` kernels (schema and meaning: gacd_fast/ops/info_nce.py): d query,
    d positive, d negatives in the inputs' dtypes, each empty where not asked for. ``negatives`` may
    be None when ``dq_neg`` (from the forward) is given and its gradient is not asked for."""
    scale = 1.0 / temperature
    q, p, n, idx, g, lse = _contig(query, positive, negatives, neg_index, grad.to(torch.float32), lse)
    dq = dp = dn = None
    if need_query or need_positive:
        dq, dp = _grad_query_positive(g, q, p, n, idx, lse, dq_neg, scale, normalize, need_query)
    if need_negatives:
        dn = _grad_negatives(g, q, n, idx, lse, scale, normalize)
    return (dq if need_query else q.new_empty(0), dp if need_positive else q.new_empty(0),
            dn if need_negatives else q.new_empty(0))
