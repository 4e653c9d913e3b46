"""Independent float64 oracles: every op written from the formulas of docs/design.md ("Op
contracts"), in plain torch, materialising everything.

Nothing here imports gacd_fast: an expected value never comes from the code under test. Each
oracle computes in float64 (pass float64 tensors that require grad to get exact gradients by
autograd) and assumes finite, valid inputs; the NaN/inf and bad-input rules are tested against
the reference in tests/property_cases.py and tests/test_bad_inputs.py.
"""
from __future__ import annotations

import torch

NORM_EPS = 1e-12  # F.normalize's eps: x / max(||x||, eps)


def _f64(x: torch.Tensor) -> torch.Tensor:
    """float64 view of ``x`` that keeps its autograd graph (a float64 leaf stays that leaf)."""
    return x.to(torch.float64)


def _per_sample(v: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A per-sample [B] value shaped [B, 1, ...] to broadcast over ``like`` [B, ...], in its dtype."""
    if isinstance(v, torch.Tensor):
        return v.detach().to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
    return v


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] float64: each row divided by max(||row||_2, 1e-12), F.normalize's gradient."""
    x = _f64(x)
    return x / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] -> [B] float64: normalize(a)_i . normalize(b)_i."""
    return (normalize(a) * normalize(b)).sum(dim=1)


def _scores(query, positive, negatives, neg_index, temperature, normalize_rows):
    """s_pos [B] and the list of each row's negative scores [K or M], all divided by tau."""
    q, p, n = (_f64(t) for t in (query, positive, negatives))
    if normalize_rows:
        q, p, n = normalize(q), normalize(p), normalize(n)
    s_pos = (q * p).sum(dim=1) / temperature
    s_neg = [(n if neg_index is None else n[neg_index[i].long()]) @ q[i] / temperature for i in range(q.shape[0])]
    return s_pos, s_neg


def logit_scale(query, positive, negatives, neg_index, temperature, normalize_rows) -> torch.Tensor:
    """[B] float64: the largest finite |logit| of each row (0 if none). A loss computed in a dtype
    with unit roundoff u can be off by about u times this: at |s| ~ 1e30 one unit of s is ~1e23, so
    l = lse - s_pos is only known to that absolute accuracy, on any backend."""
    s_pos, s_neg = _scores(query, positive, negatives, neg_index, temperature, normalize_rows)
    rows = [torch.cat([s_pos[i:i + 1], neg]).abs() for i, neg in enumerate(s_neg)]
    return torch.stack([torch.where(torch.isfinite(r), r, torch.zeros_like(r)).max() for r in rows])


def info_nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: torch.Tensor | None,
    temperature: float,
    normalize_rows: bool,
) -> torch.Tensor:
    """Unweighted InfoNCE per row [B] float64, row by row.

    l_i = logsumexp({s_pos_i} U {q_i . n / tau for n in row i's negatives}) - s_pos_i, with the
    negatives every row of ``negatives`` [K, D] (shared bank) or ``negatives[neg_index[i]]``.
    Infinite logits follow torch.logsumexp (a +inf score gives a +inf row).
    """
    s_pos, s_neg = _scores(query, positive, negatives, neg_index, temperature, normalize_rows)
    return torch.stack([torch.logsumexp(torch.cat([s_pos[i:i + 1], neg]), dim=0) - s_pos[i]
                        for i, neg in enumerate(s_neg)])


def nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: torch.Tensor | None,
    temperature: float,
    normalize_rows: bool,
    num_data: int,
) -> torch.Tensor:
    """CRD's NCE critic per row [B] float64, literally as CRD writes it.

    h(s) = exp(s) / (exp(s) + K / num_data) with s already divided by tau and K the negatives per
    row; l_i = -log h(s_pos_i) - sum_k log(1 - h(s_ik)).
    """
    s_pos, s_neg = _scores(query, positive, negatives, neg_index, temperature, normalize_rows)
    noise = s_neg[0].shape[0] / num_data

    def h(s):
        return torch.exp(s) / (torch.exp(s) + noise)

    return torch.stack([-torch.log(h(s_pos[i])) - torch.log(1 - h(neg)).sum() for i, neg in enumerate(s_neg)])


def weighted_reduce(rows: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """The weights (constants) and the reduction of a per-row loss [B], in float64.

    "none": [B] w_i l_i; "sum": sum_i w_i l_i; "mean": sum_i w_i l_i / sum_i w_i, 0 when the
    weights sum to 0. No weights: all ones (so "mean" is the plain mean).
    """
    rows = _f64(rows)
    w = torch.ones_like(rows) if weights is None else weights.detach().to(torch.float64)
    if reduction == "none":
        return w * rows
    total = (w * rows).sum()
    if reduction == "sum":
        return total
    return total * 0 if float(w.sum()) == 0 else total / w.sum()


def pgd_linf_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    alpha: float | torch.Tensor,
    eps: float | torch.Tensor,
    clip_min: float,
    clip_max: float,
) -> torch.Tensor:
    """torchattacks' linf step, out of place, in the inputs' dtype and op order (so float inputs
    give the exact bits a backend must produce; float64 inputs give the float64 value):
    clamp(x_nat + clamp(x_adv + alpha * sign(grad) - x_nat, -eps, eps), clip_min, clip_max).
    ``alpha``/``eps``: reals or per-sample [B] tensors."""
    a, e = _per_sample(alpha, x_adv), _per_sample(eps, x_adv)
    adv = x_adv + a * torch.sign(grad)
    delta = torch.clamp(adv - x_nat, min=-e, max=e)
    return torch.clamp(x_nat + delta, clip_min, clip_max)


def pgd_l2_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    alpha: float | torch.Tensor,
    eps: float | torch.Tensor,
    clip_min: float,
    clip_max: float,
) -> torch.Tensor:
    """The l2 step in float64, per sample: x + alpha * g / ||g|| (no step where ||g|| = 0), the
    perturbation scaled by min(1, eps / ||delta||), then clamped. Returns float64 [B, ...]."""
    x_adv, grad, x_nat = _f64(x_adv), _f64(grad), _f64(x_nat)
    batch = x_adv.shape[0]
    alphas, radii = (v.double().flatten() if isinstance(v, torch.Tensor)
                     else torch.full((batch,), float(v), dtype=torch.float64) for v in (alpha, eps))
    out = torch.empty_like(x_adv)
    for i in range(batch):
        g_norm = grad[i].norm()
        step = alphas[i] * grad[i] / g_norm if g_norm > 0 else torch.zeros_like(grad[i])
        delta = x_adv[i] + step - x_nat[i]
        d_norm = delta.norm()
        if d_norm > radii[i]:
            delta = delta * (radii[i] / d_norm)
        out[i] = torch.clamp(x_nat[i] + delta, clip_min, clip_max)
    return out
