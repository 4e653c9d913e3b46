"""Memory-lean InfoNCE for the torch backend: the negatives are visited in chunks with a running
log-sum-exp, so no B x K logits (nor a [B, M, D] gather) is ever held whole.

Only the negatives' log-sum-exp is O(B x K); it is one autograd Function, ``_NegativeLSE``.
When the negatives need no gradient (a memory bank: the main case) its forward also accumulates
d lse_i / d q_i = sum_k softmax_ik n_k / tau (flash-attention's output with V = K), so backward is a
per-row scale and the bank is not saved: an in-place bank update after forward stays safe.
When the negatives need a gradient (in-batch keys) backward recomputes the chunks from the stored
LSE instead. That lean path keeps no bank, so it cannot give second-order gradients: its backward
refuses create_graph=True with a RuntimeError (the recompute path is twice differentiable).
Infinite scores follow torch.logsumexp: a +inf score gives lse = +inf, never NaN from inf - inf.
"""
from __future__ import annotations

import torch

from .._numerics import acc_dtype
from .info_nce import SECOND_ORDER_ERROR
from .norms import l2_normalize

# Elements of one chunk's temporary ([B, c] logits, or [B, c, D] gathered rows): 4 MB in float32,
# big enough that each chunk's matmul runs at full speed.
CHUNK_ELEMENTS = 1 << 20


def _chunk_len(batch: int, width: int, total: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, chunk)
    return max(1, min(total, CHUNK_ELEMENTS // max(1, batch * width)))


def _scores(q: torch.Tensor, n: torch.Tensor, idx: torch.Tensor | None, c0: int, c1: int, scale: float):
    """Chunk [c0, c1) of the scaled scores [B, c] and the rows they use ([c, D] or [B, c, D])."""
    if idx is None:
        rows = n[c0:c1]
        return (q @ rows.t()) * scale, rows
    rows = n[idx[:, c0:c1]]
    return torch.einsum("bd,bcd->bc", q, rows) * scale, rows


class _NegativeLSE(torch.autograd.Function):
    """lse_i = log sum_k exp(scale * q_i . n_k) over row i's negatives; q, n in one float dtype."""

    @staticmethod
    def forward(ctx, q, n, idx, scale, chunk, grad_in_forward):
        B, D = q.shape
        total = n.shape[0] if idx is None else idx.shape[1]
        step = _chunk_len(B, 1 if idx is None else D, total, chunk)
        m = torch.full((B,), float("-inf"), dtype=q.dtype, device=q.device)
        s_sum = torch.zeros(B, dtype=q.dtype, device=q.device)
        acc = torch.zeros_like(q) if grad_in_forward else None
        for c0 in range(0, total, step):
            s, rows = _scores(q, n, idx, c0, min(total, c0 + step), scale)
            m_new = torch.maximum(m, s.amax(1))
            # rows whose max is still -inf (only from -inf scores) would give nan: keep them at 0
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - shift)
            p = torch.exp(s - shift[:, None])
            s_sum = s_sum * alpha + p.sum(1)
            if acc is not None:
                pn = p @ rows if idx is None else torch.einsum("bc,bcd->bd", p, rows)
                acc = acc * alpha[:, None] + pn
            m = m_new
        lse = m + torch.log(s_sum)
        ctx.scale, ctx.chunk, ctx.step = scale, chunk, step
        if acc is not None:
            ctx.save_for_backward(acc * (scale / s_sum)[:, None])
            ctx.grad_in_forward = True
        else:
            ctx.save_for_backward(q, n, idx, lse)
            ctx.grad_in_forward = False
        return lse

    @staticmethod
    def backward(ctx, g):
        if ctx.grad_in_forward:
            if torch.is_grad_enabled():  # create_graph: d(dlse_dq)/dq needs the bank, not kept
                raise RuntimeError(SECOND_ORDER_ERROR)
            (dlse_dq,) = ctx.saved_tensors
            return g[:, None] * dlse_dq, None, None, None, None, None
        q, n, idx, lse = ctx.saved_tensors
        need_q, need_n = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = n.shape[0] if idx is None else idx.shape[1]
        dq = torch.zeros_like(q) if need_q else None
        dn = torch.zeros_like(n) if need_n else None
        for c0 in range(0, total, ctx.step):
            c1 = min(total, c0 + ctx.step)
            s, rows = _scores(q, n, idx, c0, c1, ctx.scale)
            p = torch.exp(s - lse[:, None]) * (g * ctx.scale)[:, None]  # dL/ds / tau-folded
            if idx is None:
                if need_q:
                    dq += p @ rows
                if need_n:
                    dn[c0:c1] += p.t() @ q
            else:
                if need_q:
                    dq += torch.einsum("bc,bcd->bd", p, rows)
                if need_n:
                    contrib = p[:, :, None] * q[:, None, :]
                    dn.index_add_(0, idx[:, c0:c1].reshape(-1), contrib.reshape(-1, q.shape[1]))
        return dq, dn, None, None, None, None


def info_nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: torch.Tensor | None,
    temperature: float,
    normalize: bool,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """Per-row loss l [B] as ``reference.info_nce_rows`` defines it, without B x K memory.

    ``chunk``: negatives per chunk (default: sized so one chunk's temporary is ~16 MB).
    """
    acc = acc_dtype(query.dtype)
    q, p, n = (t.to(acc) for t in (query, positive, negatives))
    if normalize:
        q, p, n = (l2_normalize(t) for t in (q, p, n))
    idx = None if neg_index is None else neg_index.long()
    grad_in_forward = torch.is_grad_enabled() and q.requires_grad and not n.requires_grad
    lse_neg = _NegativeLSE.apply(q, n, idx, 1.0 / temperature, chunk, grad_in_forward)
    s_pos = (q * p).sum(-1) / temperature
    return torch.logaddexp(s_pos, lse_neg) - s_pos
