"""Weighted-InfoNCE core: per-row loss l_i = LSE({s_pos_i} U {q_i.n/tau}) - s_pos_i, forward and
backward, without a B x K (or B x M x D) buffer.

Forward
    * inverse norms 1/max(||x||, 1e-12) of query, positive and bank rows are computed once per row
      (similarity.row_inv_norms) and applied to the raw dot products inside the tiles: no normalised
      copy of the bank is made. normalize=False uses ones.
    * split-K: program (row block, chunk of negatives) keeps an online max/sum in base 2 (the scale
      1/tau * log2(e) folded into one multiplier, exp2) and writes one partial (m, l) per row; a
      combine kernel adds the positive logit and merges the partials in a fixed order into the
      fp32 LSE per row and the loss. Deterministic; the grid fills a GPU even for small B and huge K.
    * shared bank: [BLOCK_M, BLOCK_D] x [BLOCK_D, BLOCK_N] tl.dot tiles, D looped in BLOCK_D chunks.
      neg_index [B, M]: one query row per program gathers its bank rows by index inside the kernel.
Backward (recomputes the score tiles from the stored LSE; no atomics, bitwise deterministic)
    * dq: row-parallel (a program owns BLOCK_M rows x BLOCK_DO output columns; split-K partials, if
      any, are summed in a fixed order), then the positive term and the chain rule through the
      normalisation (similarity.normalize_backward) on B x D tensors.
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

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LIB, cdiv, dot_precision, interpreting, pow2, sm_count, upcast_dot
from .similarity import normalize_backward, row_inv_norms

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


class _Config:
    """Launch settings. ``num_splits``: force the number of split-K chunks (None: automatic; tests
    set it to exercise the split/combine path under the interpreter)."""

    num_splits: Optional[int] = None


config = _Config()


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bank_scores(q_ptr, n_ptr, rows, rmask, cols, cmask, D, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Raw dot products q_rows . n_cols [BLOCK_M, BLOCK_N] in fp32, D looped in BLOCK_D chunks."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        qt = tl.load(q_ptr + rows[:, None] * D + dd[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        nt = tl.load(n_ptr + cols[None, :] * D + dd[:, None], mask=cmask[None, :] & dmask[:, None], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            nt = nt.to(tl.float32)
        s = tl.dot(qt, nt, s, input_precision=DOT_PREC)
    return s


@triton.jit
def _gather_scores(q_ptr, n_ptr, row, nid, jmask, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Raw dot products q_row . n[nid] [BLOCK_N] in fp32 for one query row and gathered bank rows."""
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        qv = tl.load(q_ptr + row * D + dd, mask=dmask, other=0.0).to(tl.float32)
        nt = tl.load(n_ptr + nid[:, None] * D + dd[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
        s += tl.sum(nt.to(tl.float32) * qv[None, :], axis=1)
    return s


@triton.jit
def _fwd_bank_kernel(q_ptr, n_ptr, rq_ptr, rn_ptr, m_ptr, l_ptr, B, K, D, chunk, scale2,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_s = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rq = tl.load(rq_ptr + rows, mask=rmask, other=0.0) * scale2  # 1/||q|| * log2(e)/tau, folded
    k_start = pid_s * chunk
    k_end = tl.minimum(k_start + chunk, K)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        cmask = cols < k_end
        s = _bank_scores(q_ptr, n_ptr, rows, rmask, cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PREC)
        rn = tl.load(rn_ptr + cols, mask=cmask, other=0.0)
        t = tl.where(cmask[None, :], s * rq[:, None] * rn[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(t, axis=1))  # every chunk has a valid column: m_new is finite
        l = l * tl.exp2(m - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
        m = m_new
    tl.store(m_ptr + pid_s * B + rows, m, mask=rmask)
    tl.store(l_ptr + pid_s * B + rows, l, mask=rmask)


@triton.jit
def _fwd_gather_kernel(q_ptr, n_ptr, idx_ptr, rq_ptr, rn_ptr, m_ptr, l_ptr, B, M, D, chunk, scale2,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    rq = tl.load(rq_ptr + row) * scale2
    j_start = pid_s * chunk
    j_end = tl.minimum(j_start + chunk, M)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # per-lane running max/sum, merged at the end
    l = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j0 in range(j_start, j_end, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        jmask = js < j_end
        nid = tl.load(idx_ptr + row * M + js, mask=jmask, other=0).to(tl.int64)
        s = _gather_scores(q_ptr, n_ptr, row, nid, jmask, D, BLOCK_N, BLOCK_D)
        rn = tl.load(rn_ptr + nid, mask=jmask, other=0.0)
        t = tl.where(jmask, s * rq * rn, float("-inf"))
        m_new = tl.maximum(m, t)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes with no column yet
        l = l * tl.exp2(m - safe) + tl.exp2(t - safe)
        m = m_new
    mx = tl.max(m, axis=0)
    tot = tl.sum(tl.where(m == float("-inf"), 0.0, l * tl.exp2(m - mx)), axis=0)
    tl.store(m_ptr + pid_s * B + row, mx)
    tl.store(l_ptr + pid_s * B + row, tot)


@triton.jit
def _combine_kernel(q_ptr, p_ptr, rq_ptr, rp_ptr, m_ptr, l_ptr, loss_ptr, lse_ptr, B, D, S, scale2,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Adds the positive logit to the split partials (fixed order) -> lse (natural log, fp32), loss."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    qp = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        msk = rmask[:, None] & (dd < D)[None, :]
        off = rows[:, None] * D + dd[None, :]
        qt = tl.load(q_ptr + off, mask=msk, other=0.0).to(tl.float32)
        pt = tl.load(p_ptr + off, mask=msk, other=0.0).to(tl.float32)
        qp += tl.sum(qt * pt, axis=1)
    rq = tl.load(rq_ptr + rows, mask=rmask, other=0.0)
    rp = tl.load(rp_ptr + rows, mask=rmask, other=0.0)
    t_pos = qp * rq * rp * scale2
    sp = tl.arange(0, BLOCK_S)
    pm = rmask[:, None] & (sp < S)[None, :]
    off = sp[None, :].to(tl.int64) * B + rows[:, None]
    ms = tl.load(m_ptr + off, mask=pm, other=float("-inf"))
    ls = tl.load(l_ptr + off, mask=pm, other=0.0)
    mx = tl.maximum(t_pos, tl.max(ms, axis=1))
    tot = tl.exp2(t_pos - mx) + tl.sum(tl.where(pm, ls * tl.exp2(ms - mx[:, None]), 0.0), axis=1)
    lse2 = mx + tl.log2(tot)
    tl.store(lse_ptr + rows, lse2 * LN2, mask=rmask)
    tl.store(loss_ptr + rows, (lse2 - t_pos) * LN2, mask=rmask)


@triton.jit
def _dq_bank_kernel(q_ptr, n_ptr, rq_ptr, rn_ptr, lse_ptr, g_ptr, out_ptr, B, K, D, chunk, scale2, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """out[split, rows, dcols] = sum_j g_i P_ij n_j / ||n_j|| / tau over this split's bank rows."""
    pid_d = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    rq = tl.load(rq_ptr + rows, mask=rmask, other=0.0) * scale2
    lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
    gs = tl.load(g_ptr + rows, mask=rmask, other=0.0) * scale
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    acc = tl.zeros([BLOCK_M, BLOCK_DO], dtype=tl.float32)
    k_start = pid_s * chunk
    k_end = tl.minimum(k_start + chunk, K)
    for k0 in range(k_start, k_end, BLOCK_N):
        cols = k0 + tl.arange(0, BLOCK_N)
        cmask = cols < k_end
        s = _bank_scores(q_ptr, n_ptr, rows, rmask, cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PREC)
        rn = tl.load(rn_ptr + cols, mask=cmask, other=0.0)
        p = tl.exp2(s * rq[:, None] * rn[None, :] - lse2[:, None])
        w = tl.where(rmask[:, None] & cmask[None, :], p * gs[:, None] * rn[None, :], 0.0)
        nt = tl.load(n_ptr + cols[:, None] * D + do[None, :], mask=cmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(w, nt.to(tl.float32), acc, input_precision=DOT_PREC)
    tl.store(out_ptr + pid_s * B * D + rows[:, None] * D + do[None, :], acc, mask=rmask[:, None] & domask[None, :])


@triton.jit
def _dq_gather_kernel(q_ptr, n_ptr, idx_ptr, rq_ptr, rn_ptr, lse_ptr, g_ptr, out_ptr, coef_ptr, B, M, D, chunk,
                      scale2, scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                      WRITE_DQ: tl.constexpr, WRITE_COEF: tl.constexpr):
    """dq partials for one row (as _dq_bank_kernel); optionally coef[row, j] = g P_ij / ||q|| / tau."""
    row = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rq_raw = tl.load(rq_ptr + row)
    rq = rq_raw * scale2
    lse2 = tl.load(lse_ptr + row) * 1.4426950408889634
    gs = tl.load(g_ptr + row) * scale
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    acc = tl.zeros([BLOCK_DO], dtype=tl.float32)
    j_start = pid_s * chunk
    j_end = tl.minimum(j_start + chunk, M)
    for j0 in range(j_start, j_end, BLOCK_N):
        js = j0 + tl.arange(0, BLOCK_N)
        jmask = js < j_end
        nid = tl.load(idx_ptr + row * M + js, mask=jmask, other=0).to(tl.int64)
        s = _gather_scores(q_ptr, n_ptr, row, nid, jmask, D, BLOCK_N, BLOCK_D)
        rn = tl.load(rn_ptr + nid, mask=jmask, other=0.0)
        p = tl.where(jmask, tl.exp2(s * rq * rn - lse2), 0.0)
        if WRITE_DQ:
            nt = tl.load(n_ptr + nid[:, None] * D + do[None, :], mask=jmask[:, None] & domask[None, :], other=0.0)
            acc += tl.sum((p * gs * rn)[:, None] * nt.to(tl.float32), axis=0)
        if WRITE_COEF:
            if pid_d == 0:
                tl.store(coef_ptr + row * M + js, p * gs * rq_raw, mask=jmask)
    if WRITE_DQ:
        tl.store(out_ptr + pid_s * B * D + row * D + do, acc, mask=domask)


@triton.jit
def _dn_bank_kernel(q_ptr, n_ptr, rq_ptr, rn_ptr, lse_ptr, g_ptr, out_ptr, B, K, D, scale2, scale,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
                    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """out[cols, dcols] = sum_i g_i P_ij q_i / ||q_i|| / tau: one owner per bank row block."""
    pid_d = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < K
    rn = tl.load(rn_ptr + cols, mask=cmask, other=0.0)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for i0 in range(0, B, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < B
        s = _bank_scores(q_ptr, n_ptr, rows, rmask, cols, cmask, D, BLOCK_M, BLOCK_N, BLOCK_D, UPCAST, DOT_PREC)
        rq_raw = tl.load(rq_ptr + rows, mask=rmask, other=0.0)
        lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
        gs = tl.load(g_ptr + rows, mask=rmask, other=0.0) * scale
        p = tl.exp2(s * (rq_raw * scale2)[:, None] * rn[None, :] - lse2[:, None])
        w = tl.where(rmask[:, None] & cmask[None, :], p * (gs * rq_raw)[:, None], 0.0)
        qt = tl.load(q_ptr + rows[:, None] * D + do[None, :], mask=rmask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(tl.trans(w), qt.to(tl.float32), acc, input_precision=DOT_PREC)
    tl.store(out_ptr + cols[:, None] * D + do[None, :], acc, mask=cmask[:, None] & domask[None, :])


@triton.jit
def _dn_segment_kernel(q_ptr, rows_ptr, qi_ptr, coef_ptr, bounds_ptr, out_ptr, K, D,
                       BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_DO: tl.constexpr, DOT_PREC: tl.constexpr):
    """out[r, dcols] = sum over sorted entries e with row r of coef_e * q[qi_e]: a program owns bank
    rows [j0, j0 + BLOCK_N), whose entries are contiguous in the stable sort, visited in order."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    j0 = pid_n * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    domask = do < D
    e_start = tl.load(bounds_ptr + pid_n)
    e_end = tl.load(bounds_ptr + pid_n + 1)
    acc = tl.zeros([BLOCK_N, BLOCK_DO], dtype=tl.float32)
    for e0 in range(e_start, e_end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        emask = es < e_end
        r = tl.load(rows_ptr + es, mask=emask, other=-1)
        qi = tl.load(qi_ptr + es, mask=emask, other=0)
        c = tl.load(coef_ptr + es, mask=emask, other=0.0)
        hit = (r[None, :] == cols[:, None]) & emask[None, :]
        w = tl.where(hit, c[None, :], 0.0)  # [BLOCK_N, BLOCK_E] one-hot rows scaled by coef
        qt = tl.load(q_ptr + qi[:, None] * D + do[None, :], mask=emask[:, None] & domask[None, :], other=0.0)
        acc = tl.dot(w, qt.to(tl.float32), acc, input_precision=DOT_PREC)
    tl.store(out_ptr + cols[:, None] * D + do[None, :], acc, mask=(cols < K)[:, None] & domask[None, :])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def _bank_blocks(B: int, D: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) of the shared-bank tiles."""
    if interpreting():  # few, big programs: the interpreter pays per program and per loop trip
        return pow2(B, 16, 64), 512, pow2(D, 16, 256)
    return pow2(B, 16, 64), 64, pow2(D, 16, 64)


def _gather_blocks(M: int, D: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the gathered tiles."""
    if interpreting():
        return pow2(M, 16, 1024), pow2(D, 16, 256)
    return pow2(M, 16, 64), pow2(D, 16, 128)


def _out_block(D: int) -> int:
    """Output columns per backward program: all of D up to 256 (beyond it the scores are recomputed
    once per 256-column slice)."""
    return pow2(D, 16, 256)


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


def _forward(q, p, n, idx, scale, normalize):
    B, D = q.shape
    rq, rp, rn = _norms(q, normalize), _norms(p, normalize), _norms(n, normalize)
    scale2 = scale * LOG2E
    if idx is None:
        K = n.shape[0]
        bm, bn, bd = _bank_blocks(B, D)
        S, chunk = _splits(cdiv(B, bm), K, bn, q.device)
        m_part = torch.empty((S, B), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        _fwd_bank_kernel[(cdiv(B, bm), S)](
            q, n, rq, rn, m_part, l_part, B, K, D, chunk, scale2,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=upcast_dot(q.dtype), DOT_PREC=dot_precision(q.dtype),
        )
    else:
        M = idx.shape[1]
        bn, bd = _gather_blocks(M, D)
        S, chunk = _splits(B, M, bn, q.device)
        m_part = torch.empty((S, B), dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
        _fwd_gather_kernel[(B, S)](q, n, idx, rq, rn, m_part, l_part, B, M, D, chunk, scale2, BLOCK_N=bn, BLOCK_D=bd)
    loss = torch.empty(B, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(loss)
    bm = pow2(B, 1, 64)
    _combine_kernel[(cdiv(B, bm),)](
        q, p, rq, rp, m_part, l_part, loss, lse, B, D, S, scale2,
        BLOCK_M=bm, BLOCK_D=pow2(D, 16, 256), BLOCK_S=pow2(S, 2),
    )
    return loss, lse


def _contig(*ts):
    return tuple(None if t is None else t.contiguous() for t in ts)


@torch.library.custom_op(f"{LIB}::info_nce_fwd", mutates_args=())
def _info_nce_fwd(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                  neg_index: Optional[torch.Tensor], scale: float, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, p, n, idx = _contig(query, positive, negatives, neg_index)
    return _forward(q, p, n, idx, scale, normalize)


@_info_nce_fwd.register_fake
def _(query, positive, negatives, neg_index, scale, normalize):
    B = query.shape[0]
    return query.new_empty(B, dtype=torch.float32), query.new_empty(B, dtype=torch.float32)


def _dq_neg(q, n, idx, rq, rn, lse, g, scale, want_coef: bool, want_dq: bool = True):
    """sum_j g_i P_ij n^_j / tau [B, D] fp32 (None if not ``want_dq``), and the gather-mode coef."""
    B, D = q.shape
    bdo = _out_block(D)
    scale2 = scale * LOG2E
    coef = None
    if idx is None:
        K = n.shape[0]
        bm, bn, bd = _bank_blocks(B, D)
        S, chunk = _splits(cdiv(B, bm) * cdiv(D, bdo), K, bn, q.device)
        part = torch.empty((S, B, D), dtype=torch.float32, device=q.device)
        _dq_bank_kernel[(cdiv(B, bm), cdiv(D, bdo), S)](
            q, n, rq, rn, lse, g, part, B, K, D, chunk, scale2, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo,
            UPCAST=upcast_dot(q.dtype), DOT_PREC=dot_precision(q.dtype),
        )
    else:
        M = idx.shape[1]
        bn, bd = _gather_blocks(M, D)
        S, chunk = _splits(B * cdiv(D, bdo), M, bn, q.device)
        if want_coef:
            S, chunk = 1, cdiv(M, bn) * bn  # coef written once per (row, slot): keep one chunk per row
        part = torch.empty((S, B, D) if want_dq else (1,), dtype=torch.float32, device=q.device)
        coef = torch.empty((B, M), dtype=torch.float32, device=q.device) if want_coef else part
        _dq_gather_kernel[(B, cdiv(D, bdo) if want_dq else 1, S)](
            q, n, idx, rq, rn, lse, g, part, coef, B, M, D, chunk, scale2, scale,
            BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo, WRITE_DQ=want_dq, WRITE_COEF=want_coef,
        )
        if not want_coef:
            coef = None
        if not want_dq:
            return None, coef
    dq = part[0] if part.shape[0] == 1 else part.sum(0)  # fixed-order merge of the split partials
    return dq, coef


@torch.library.custom_op(f"{LIB}::info_nce_bwd_qp", mutates_args=())
def _info_nce_bwd_qp(grad: torch.Tensor, query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                     neg_index: Optional[torch.Tensor], loss: torch.Tensor, lse: torch.Tensor, scale: float,
                     normalize: bool, need_q: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, p, n, idx, g, lse = _contig(query, positive, negatives, neg_index, grad.to(torch.float32), lse)
    rq, rp = _norms(q, normalize), _norms(p, normalize)
    # positive column: dl/ds_pos = P_pos - 1 with P_pos = exp(s_pos - lse) = exp(-loss)
    cpos = (g * scale * torch.expm1(-loss))[:, None]
    qh, ph = q.float() * rq[:, None], p.float() * rp[:, None]  # B x D normalised rows (not the bank)
    dph = cpos * qh
    dp = normalize_backward(p, dph) if normalize else dph.to(p.dtype)
    if not need_q:
        return torch.zeros_like(q), dp
    rn = _norms(n, normalize)
    dqh, _ = _dq_neg(q, n, idx, rq, rn, lse, g, scale, want_coef=False)
    dqh = dqh + cpos * ph
    dq = normalize_backward(q, dqh) if normalize else dqh.to(q.dtype)
    return dq, dp


@_info_nce_bwd_qp.register_fake
def _(grad, query, positive, negatives, neg_index, loss, lse, scale, normalize, need_q):
    return (torch.empty_like(query, memory_format=torch.contiguous_format),
            torch.empty_like(positive, memory_format=torch.contiguous_format))


@torch.library.custom_op(f"{LIB}::info_nce_bwd_n", mutates_args=())
def _info_nce_bwd_n(grad: torch.Tensor, query: torch.Tensor, negatives: torch.Tensor,
                    neg_index: Optional[torch.Tensor], lse: torch.Tensor, scale: float,
                    normalize: bool) -> torch.Tensor:
    q, n, idx, g, lse = _contig(query, negatives, neg_index, grad.to(torch.float32), lse)
    B, D = q.shape
    K = n.shape[0]
    rq, rn = _norms(q, normalize), _norms(n, normalize)
    bdo = _out_block(D)
    dnh = torch.empty((K, D), dtype=torch.float32, device=q.device)
    if idx is None:
        bm, bn, bd = _bank_blocks(B, D)
        bn = min(bn, 128) if not interpreting() else bn
        _dn_bank_kernel[(cdiv(K, bn), cdiv(D, bdo))](
            q, n, rq, rn, lse, g, dnh, B, K, D, scale * LOG2E, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DO=bdo,
            UPCAST=upcast_dot(q.dtype), DOT_PREC=dot_precision(q.dtype),
        )
    else:
        M = idx.shape[1]
        _, coef = _dq_neg(q, n, idx, rq, rn, lse, g, scale, want_coef=True, want_dq=False)
        flat = idx.reshape(-1).to(torch.int64)
        srows, order = torch.sort(flat, stable=True)  # deterministic order of the contributions
        qi = order // M
        scoef = coef.reshape(-1)[order]
        bn = 64 if interpreting() else 32
        nblk = cdiv(K, bn)
        edges = torch.arange(0, nblk + 1, device=q.device, dtype=torch.int64) * bn
        bounds = torch.searchsorted(srows, edges)
        be = 256 if interpreting() else 32
        _dn_segment_kernel[(nblk, cdiv(D, bdo))](
            q, srows, qi, scoef, bounds, dnh, K, D,
            BLOCK_N=bn, BLOCK_E=be, BLOCK_DO=bdo, DOT_PREC=dot_precision(q.dtype),
        )
    return normalize_backward(n, dnh) if normalize else dnh.to(n.dtype)


@_info_nce_bwd_n.register_fake
def _(grad, query, negatives, neg_index, lse, scale, normalize):
    return torch.empty_like(negatives, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    query, positive, negatives, neg_index, scale, normalize = inputs
    loss, lse = output
    ctx.save_for_backward(query, positive, negatives, neg_index, loss, lse)
    ctx.scale, ctx.normalize = scale, normalize


def _backward(ctx, grad_loss, grad_lse):
    # lse is an internal output (the public function returns only the loss): its grad is ignored
    query, positive, negatives, neg_index, loss, lse = ctx.saved_tensors
    need_q, need_p, need_n = ctx.needs_input_grad[:3]
    dq = dp = dn = None
    if need_q or need_p:
        dq, dp = torch.ops.gacd_triton.info_nce_bwd_qp(
            grad_loss, query, positive, negatives, neg_index, loss, lse, ctx.scale, ctx.normalize, need_q)
    if need_n:
        dn = torch.ops.gacd_triton.info_nce_bwd_n(grad_loss, query, negatives, neg_index, lse, ctx.scale, ctx.normalize)
    return (dq if need_q else None), (dp if need_p else None), dn, None, None, None


_info_nce_fwd.register_autograd(_backward, setup_context=_setup_context)


def info_nce_rows(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                  neg_index: Optional[torch.Tensor], temperature: float, normalize: bool) -> torch.Tensor:
    """Unweighted per-row InfoNCE loss [B] fp32.

    query, positive [B, D] and negatives [K, D] in one of fp16/bf16/fp32; neg_index None (every row
    against the whole bank) or int32/int64 [B, M]. Differentiable w.r.t. query, positive, negatives.
    """
    loss, _ = torch.ops.gacd_triton.info_nce_fwd(query, positive, negatives, neg_index, 1.0 / temperature, normalize)
    return loss
