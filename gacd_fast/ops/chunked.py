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

bfloat16/float16 inputs: where the device multiplies them natively (``_precision.fast_products``:
a GPU, a CPU with AVX512-BF16/AMX; ``GACD_FAST_LOWP_PRODUCTS=1`` forces it, ``0`` forbids it) the
score and gradient products run in the input dtype on the rows normalised in float32 and rounded
back, and every sum (the running max and sum, dq, dn) accumulates in float32. Elsewhere the rows are
upcast to float32 first, because emulated half products are far slower than float32 ones.
"""
from __future__ import annotations

import torch

from .. import _precision
from .._numerics import acc_dtype
from .contract import second_order_error
from .norms import l2_normalize

# Also the compiled backends' message (their backward is first-order only): info_nce.py takes it from here.
SECOND_ORDER_ERROR = second_order_error(
    "info_nce", "by the torch backend with negatives that require grad; this call's backward is first-order only"
)

# Elements of one chunk's temporary ([B, c] logits, or [B, c, D] gathered rows): 4 MB in float32,
# big enough that each chunk's matmul runs at full speed.
CHUNK_ELEMENTS = 1 << 20


def _chunk_len(batch: int, width: int, total: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, chunk)
    return max(1, min(total, CHUNK_ELEMENTS // max(1, batch * width)))


def _scores(q: torch.Tensor, n: torch.Tensor, idx: torch.Tensor | None, c0: int, c1: int, scale: float):
    """Chunk [c0, c1) of the scaled scores [B, c] (accumulation dtype) and the rows they use ([c, D]
    or [B, c, D], in the inputs' dtype)."""
    acc = acc_dtype(q.dtype)
    if idx is None:
        rows = n[c0:c1]
        return (q @ rows.t()).to(acc) * scale, rows
    rows = n[idx[:, c0:c1]]
    return torch.einsum("bd,bcd->bc", q, rows).to(acc) * scale, rows


def _weighted_rows(w: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """sum_c w[b, c] rows[c] (shared) or rows[b, c] (indexed): [B, D] in w's (accumulation) dtype,
    the product in the rows' dtype."""
    w = w.to(rows.dtype)
    out = w @ rows if idx is None else torch.einsum("bc,bcd->bd", w, rows)
    return out.to(torch.promote_types(out.dtype, torch.float32))


class _NegativeLSE(torch.autograd.Function):
    """lse_i = log sum_k exp(scale * q_i . n_k) over row i's negatives; q, n in the accumulation
    dtype, their products in ``prod`` (q and n rounded to it), every sum and lse in the
    accumulation dtype, as are the gradients."""

    @staticmethod
    def forward(ctx, q, n, idx, scale, chunk, grad_in_forward, prod):
        B, D = q.shape
        acc_t = q.dtype
        q, n = q.to(prod), n.to(prod)
        total = n.shape[0] if idx is None else idx.shape[1]
        step = _chunk_len(B, 1 if idx is None else D, total, chunk)
        m = torch.full((B,), float("-inf"), dtype=acc_t, device=q.device)
        s_sum = torch.zeros(B, dtype=acc_t, device=q.device)
        acc = torch.zeros(B, D, dtype=acc_t, device=q.device) if grad_in_forward else None
        for c0 in range(0, total, step):
            s, rows = _scores(q, n, idx, c0, min(total, c0 + step), scale)
            m_new = torch.maximum(m, s.amax(1))
            # rows whose max is still -inf (only from -inf scores) would give nan: keep them at 0
            shift = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - shift)
            p = torch.exp(s - shift[:, None])
            s_sum = s_sum * alpha + p.sum(1)
            if acc is not None:
                acc = acc * alpha[:, None] + _weighted_rows(p, rows, idx)
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
            return g[:, None] * dlse_dq, None, None, None, None, None, None
        q, n, idx, lse = ctx.saved_tensors
        acc_t = lse.dtype
        if torch.is_grad_enabled() and q.dtype != acc_t:  # q, n are rounded copies: no graph to the inputs
            raise RuntimeError(SECOND_ORDER_ERROR)
        need_q, need_n = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = n.shape[0] if idx is None else idx.shape[1]
        dq = torch.zeros(q.shape, dtype=acc_t, device=q.device) if need_q else None
        dn = torch.zeros(n.shape, dtype=acc_t, device=n.device) if need_n else None
        for c0 in range(0, total, ctx.step):
            c1 = min(total, c0 + ctx.step)
            s, rows = _scores(q, n, idx, c0, c1, ctx.scale)
            p = torch.exp(s - lse[:, None]) * (g * ctx.scale)[:, None]  # dL/ds / tau-folded
            if need_q:
                dq += _weighted_rows(p, rows, idx)
            if need_n:
                if idx is None:
                    dn[c0:c1] += (p.t().to(q.dtype) @ q).to(acc_t)
                else:
                    contrib = p[:, :, None] * q[:, None, :].to(acc_t)
                    dn.index_add_(0, idx[:, c0:c1].reshape(-1), contrib.reshape(-1, q.shape[1]))
        return dq, dn, None, None, None, None, None


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
    # the products in the inputs' half dtype where the device multiplies it natively (module doc)
    prod = query.dtype if _precision.fast_products(query.dtype, query.device) else acc
    lse_neg = _NegativeLSE.apply(q, n, idx, 1.0 / temperature, chunk, grad_in_forward, prod)
    s_pos = (q * p).sum(-1) / temperature
    return torch.logaddexp(s_pos, lse_neg) - s_pos
