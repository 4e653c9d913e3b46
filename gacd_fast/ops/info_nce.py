"""The InfoNCE op: its definition and the contract of its compiled backends.

``reference`` defines the unweighted per-row loss (it materialises the B x K logits on purpose: it
is the test oracle, written as literally as docs/design.md states the op). The torch backend's
memory-lean version is ``chunked.info_nce_rows``. The compiled backends (triton, cext) implement two
operators with the schemas below; :data:`OP` is what every backend's entry is built from. Inputs are
validated by ``gacd_fast.functional`` before they get here; the fakes check shapes again for
torch.compile.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._numerics import acc_dtype
from . import chunked
from .chunked import SECOND_ORDER_ERROR
from .contract import CompiledOp, Op, check_like, check_rows, first_order_only
from .norms import l2_normalize
from .self_check import SEED, Tolerance, compare, grads, leaves, rand


def reference(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: Optional[torch.Tensor],
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """Unweighted per-row loss l [B] (accumulation dtype), fully materialised.

    query, positive [B, D]; negatives [K, D]; neg_index None (every row of ``negatives`` is a
    negative of every query) or [B, M] int32/int64 rows of ``negatives`` per query.
    l_i = logsumexp({s_pos_i} U {q_i . n / tau for n in the row's negatives}) - s_pos_i.
    """
    acc = acc_dtype(query.dtype)
    q, p, n = (t.to(acc) for t in (query, positive, negatives))
    if normalize:
        q, p, n = (l2_normalize(t) for t in (q, p, n))
    s_pos = (q * p).sum(-1) / temperature
    if neg_index is None:
        s_neg = q @ n.t() / temperature  # [B, K]
    else:
        s_neg = torch.einsum("bd,bmd->bm", q, n[neg_index.long()]) / temperature  # [B, M]
    logits = torch.cat([s_pos[:, None], s_neg], dim=1)
    return torch.logsumexp(logits, dim=1) - s_pos


# ------------------------------------------------------------------------ compiled backends' contract
def _check_inputs(query, positive, negatives, neg_index) -> None:
    check_rows("query", query)
    check_like("positive", positive, "query", query)
    check_rows("negatives", negatives)
    torch._check(negatives.shape[1] == query.shape[1],
                 lambda: f"negatives must have D={query.shape[1]} columns, got {tuple(negatives.shape)}")
    torch._check(negatives.dtype == query.dtype, lambda: f"negatives must have query's dtype {query.dtype}")
    if neg_index is not None:
        torch._check(neg_index.dim() == 2 and neg_index.shape[0] == query.shape[0],
                     lambda: f"neg_index must be [B={query.shape[0]}, M], got {tuple(neg_index.shape)}")
        torch._check(neg_index.dtype in (torch.int32, torch.int64),
                     lambda: f"neg_index must be int32 or int64, got {neg_index.dtype}")


def _fake_forward(query, positive, negatives, neg_index, temperature, normalize, compute_dq):
    _check_inputs(query, positive, negatives, neg_index)
    acc = acc_dtype(query.dtype)
    batch = query.shape[0]
    dq_shape = tuple(query.shape) if compute_dq else (0,)
    return query.new_empty(batch, dtype=acc), query.new_empty(batch, dtype=acc), query.new_empty(dq_shape, dtype=acc)


def _fake_backward(grad, query, positive, negatives, neg_index, lse, dq_neg, temperature, normalize,
                   need_query, need_positive, need_negatives):
    check_rows("query", query)
    check_like("positive", positive, "query", query)
    torch._check(grad.shape == (query.shape[0],) and lse.shape == (query.shape[0],),
                 lambda: f"grad and lse must be [B={query.shape[0]}], got {tuple(grad.shape)}, {tuple(lse.shape)}")
    torch._check(negatives is not None or not need_negatives, lambda: "negatives are needed for their gradient")
    dq = query.new_empty(query.shape) if need_query else query.new_empty(0)
    dp = positive.new_empty(positive.shape) if need_positive else query.new_empty(0)
    dn = negatives.new_empty(negatives.shape) if need_negatives else query.new_empty(0)
    return dq, dp, dn


def _setup_context(ctx, inputs, output) -> None:
    query, positive, negatives, neg_index, temperature, normalize, _compute_dq = inputs
    _, lse, dq_neg = output
    have_dq = dq_neg.numel() > 0
    # With d lse / d q from the forward, a bank that needs no gradient is not kept: an in-place bank
    # update after the forward stays safe (its version counter is never checked).
    keep_bank = negatives.requires_grad or not have_dq
    ctx.save_for_backward(query, positive, negatives if keep_bank else None, neg_index, lse,
                          dq_neg if have_dq else None)
    ctx.temperature, ctx.normalize = temperature, normalize


def _backward(namespace: str, ctx, grad_loss, _grad_lse, _grad_dq):
    # lse and dq_neg are auxiliary outputs (the backends return only the loss): their grads are ignored.
    if grad_loss is None:
        return (None,) * 7
    first_order_only(SECOND_ORDER_ERROR)
    query, positive, negatives, neg_index, lse, dq_neg = ctx.saved_tensors
    need_q, need_p, need_n = ctx.needs_input_grad[:3]
    dq, dp, dn = BACKWARD.resolve(namespace)(
        grad_loss, query, positive, negatives, neg_index, lse, dq_neg, ctx.temperature, ctx.normalize,
        need_q, need_p, need_n,
    )
    return (dq if need_q else None), (dp if need_p else None), (dn if need_n else None), None, None, None, None


# Returns (loss [B], lse [B] over {s_pos} U negatives, dq_neg), in the accumulation dtype. lse is read
# only by the same backend's backward, in that backend's units (cext: natural log; triton: base 2).
# dq_neg is d lse / d q_hat from the negatives ([B, D]) when compute_dq, else empty.
FORWARD = CompiledOp(
    "info_nce_forward",
    "(Tensor query, Tensor positive, Tensor negatives, Tensor? neg_index, float temperature, bool normalize, "
    "bool compute_dq) -> (Tensor, Tensor, Tensor)",
    _fake_forward, _backward, _setup_context,
)
# Returns (d query, d positive, d negatives) in the inputs' dtypes, each empty where not asked for.
BACKWARD = CompiledOp(
    "info_nce_backward",
    "(Tensor grad, Tensor query, Tensor positive, Tensor? negatives, Tensor? neg_index, Tensor lse, "
    "Tensor? dq_neg, float temperature, bool normalize, bool need_query, bool need_positive, "
    "bool need_negatives) -> (Tensor, Tensor, Tensor)",
    _fake_backward,
)


def _call(forward, query, positive, negatives, *rest):
    """The per-row loss [B] from the forward operator. When the bank needs no gradient and the query
    does (the memory-bank case), the forward also computes the bank's part of d loss / d q and
    backward only scales it: the bank is read once and not saved."""
    compute_dq = torch.is_grad_enabled() and query.requires_grad and not negatives.requires_grad
    return forward(query, positive, negatives, *rest, compute_dq)[0]


def _self_check(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    """The first-use check: the four variants the pipeline runs, values and gradients."""
    gen = torch.Generator().manual_seed(SEED)
    B, K, D, M = 4, 9, 12, 5
    temperature = 0.2  # moderate logits: the gradients stay O(10), where the tolerances mean what they say
    q, p, n = (rand(gen, shape, device, dtype) for shape in ((B, D), (B, D), (K, D)))
    idx = torch.randint(K, (B, M), generator=gen).to(device)
    upstream = rand(gen, (B,), device, torch.float32, 0.5, 1.5)
    # the variants the pipeline runs: a bank with and without gradient (memory/queue rows are
    # constants), and a gathered bank (neg_index) with and without (memory bank; in-batch negatives)
    for neg_index, bank_grad in ((None, True), (None, False), (idx, False), (idx, True)):
        variant = f"info_nce_rows ({'neg_index' if neg_index is not None else 'shared bank'}, " \
                  f"negatives {'with' if bank_grad else 'without'} grad)"
        need = (True, True, bank_grad)
        ours, refs = leaves([q, p, n], need)
        got = fn(*ours, neg_index, temperature, True)
        want = reference(*refs, neg_index, temperature, True)
        compare(f"{variant}: loss", got, want, tol)
        for name, g, w in zip(("d query", "d positive", "d negatives"),
                              grads(got, ours, upstream), grads(want, refs, upstream)):
            compare(f"{variant}: {name}", g, w, tol)


OP = Op("info_nce", "info_nce_rows", reference, torch=chunked.info_nce_rows, compiled=(FORWARD, BACKWARD), call=_call,
        self_check=_self_check)
