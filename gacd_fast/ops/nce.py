"""CRD's NCE loss op: its definition. Only the torch backend runs it (it holds the B x K scores)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .._numerics import acc_dtype
from .contract import Op
from .norms import l2_normalize


def reference(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: Optional[torch.Tensor],
    temperature: float,
    normalize: bool,
    num_data: int,
    normalizer: float = 1.0,
    eps: float = 0.0,
) -> torch.Tensor:
    """CRD's NCE loss per row [B] (accumulation dtype), materialising the B x K scores.

    Shapes as :func:`gacd_fast.ops.info_nce.reference`. With P(s) = exp(s/tau) / Z
    (Z = ``normalizer``), c = K / num_data (K negatives a row) and CRD's ``eps`` in the denominators:
        l_i = -log(P_pos / (P_pos + c + eps)) - sum_k log(c / (P_k + c + eps))
            = softplus(b - s_pos/tau) + sum_k softplus(s_k/tau - b) + K log1p(eps / c),
    b = log(Z (c + eps)). Z = 1, eps = 0 is the critic h(s) = sigmoid(s/tau - log c).
    """
    acc = acc_dtype(query.dtype)
    q, p, n = (t.to(acc) for t in (query, positive, negatives))
    if normalize:
        q, p, n = (l2_normalize(t) for t in (q, p, n))
    if neg_index is None:
        s_neg = q @ n.t() / temperature
    else:
        s_neg = torch.einsum("bd,bmd->bm", q, n[neg_index.long()]) / temperature
    k = s_neg.shape[1]
    c = k / num_data
    b = math.log(normalizer) + math.log(c + eps)
    s_pos = (q * p).sum(-1) / temperature
    return _softplus(b - s_pos) + _softplus(s_neg - b).sum(1) + k * math.log1p(eps / c)


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) exactly: F.softplus returns x itself above 20, an error of up to e^-20 a score,
    which CRD's large Z (scores of 20 and more) turns into 1e-9 in a float64 loss."""
    return torch.logaddexp(x, torch.zeros_like(x))


OP = Op("nce", "nce_rows", reference, compiled_in=())
