"""The reference: plain PyTorch definitions of every op. Every backend is checked against these.

``info_nce_rows`` here materialises the B x K logits on purpose: it is the test oracle, written as
literally as docs/design.md states the op. The torch backend's memory-lean version is in ``chunked.py``.
Inputs are assumed validated (see ``gacd_fast.functional``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NORM_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-row max |x| [..., 1] where it is finite and > 0, else 1 (a constant: no gradient)."""
    m = x.detach().abs().amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m) & (m > 0), m, torch.ones_like(m))


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1, eps=1e-12)``, overflow-safe: rows are scaled by their max |x| before
    the norm, so a finite row of any magnitude (float32 up to 3e38) normalises instead of its
    squared norm overflowing to inf. x / max(||x||, eps) = (x/s) / max(||x/s||, eps/s), and with a
    constant s the gradient is that of F.normalize."""
    s = _row_scale(x)
    y = x / s
    return y / torch.maximum(y.norm(p=2, dim=-1, keepdim=True), NORM_EPS / s)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` upcast to the accumulation dtype and L2-normalised."""
    return l2_normalize(x.to(acc_dtype(x.dtype)))


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] L2-normalised rows, computed in float32/64, returned in ``x.dtype``."""
    return _unit(x).to(x.dtype)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] -> [B] in the accumulation dtype: normalize(a)_i . normalize(b)_i."""
    return (_unit(a) * _unit(b)).sum(-1)


def info_nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: torch.Tensor | None,
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """Unweighted per-row loss l [B] (accumulation dtype), fully materialised.

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


def nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: torch.Tensor | None,
    temperature: float,
    normalize: bool,
    num_data: int,
    normalizer: float = 1.0,
    eps: float = 0.0,
) -> torch.Tensor:
    """CRD's NCE loss per row [B] (accumulation dtype), materialising the B x K scores.

    With P(s) = exp(s/tau) / Z (Z = ``normalizer``), c = K / num_data (K negatives a row) and CRD's
    ``eps`` in the denominators:
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
    return F.softplus(b - s_pos) + F.softplus(s_neg - b).sum(1) + k * math.log1p(eps / c)


def _per_sample(v: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A per-sample [B] tensor viewed to broadcast over ``like`` [B, ...] in its dtype."""
    if isinstance(v, torch.Tensor):
        return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))
    return v


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm over all non-batch dims, in the accumulation dtype, shaped to broadcast."""
    n = x.to(acc_dtype(x.dtype)).flatten(1).norm(p=2, dim=1)
    return n.view(-1, *([1] * (x.dim() - 1)))


def l2_direction(grad: torch.Tensor) -> torch.Tensor:
    """Per-sample grad / ||grad|| [B, ...] in the accumulation dtype, 0 where there is no direction.

    NaN elements count as 0 (no step along them, as sign(NaN) = 0 in linf). Overflow-safe: each
    sample is scaled by its max |grad| first; with +-inf elements the direction is their limit
    (+-1 on the inf elements, 0 elsewhere, then unit length)."""
    acc = acc_dtype(grad.dtype)
    zero = torch.zeros((), dtype=acc, device=grad.device)
    g = grad.to(acc)
    g = torch.where(torch.isnan(g), zero, g)
    m = g.abs().flatten(1).amax(1).view(-1, *([1] * (g.dim() - 1)))
    u = torch.where(torch.isinf(m), torch.where(torch.isinf(g), g.sign(), zero),
                    g / torch.where(m > 0, m, torch.ones_like(m)))
    n = _row_norms(u)
    return torch.where(n > 0, u / torch.where(n > 0, n, torch.ones_like(n)), zero)


def pgd_step_(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    alpha: float | torch.Tensor,
    eps: float | torch.Tensor,
    clip_min: float,
    clip_max: float,
    norm: str,
) -> torch.Tensor:
    """One PGD step in place on ``x_adv`` [B, ...]; returns ``x_adv``.

    linf, in torchattacks' op order (bitwise):
        x_adv <- clamp(x_nat + clamp(x_adv + alpha*sign(grad) - x_nat, -eps, eps), clip_min, clip_max)
    l2: step alpha * grad / ||grad|| per sample (none where ||grad|| == 0; see ``l2_direction``
        for NaN and inf), project the perturbation onto the eps-ball (scale by
        min(1, eps/||delta||)), then clamp.
    NaN in grad takes no step (sign(NaN) = 0); NaN in x_adv or x_nat propagates.
    """
    a = _per_sample(alpha, x_adv)
    e = _per_sample(eps, x_adv)
    if norm == "linf":
        # One temporary, in place; each op rounds exactly as torchattacks' out-of-place chain
        # (adv = x_adv + a*sign(g); delta = clamp(adv - x_nat, -e, e); clamp(x_nat + delta, ...)).
        delta = grad.sign().mul_(a).add_(x_adv).sub_(x_nat).clamp_(min=-e, max=e)
    else:
        acc = acc_dtype(x_adv.dtype)
        unit = l2_direction(grad)
        adv = x_adv.to(acc) + _per_sample(alpha, unit) * unit
        delta = adv - x_nat.to(acc)
        d_norm = _row_norms(delta)
        e_acc = _per_sample(eps, delta)
        scale = torch.where(d_norm > e_acc, e_acc / d_norm, 1.0)  # d_norm > e_acc >= 0 there
        delta = (delta * scale).to(x_adv.dtype)
    return torch.clamp(delta.add_(x_nat), clip_min, clip_max, out=x_adv)


def pgd_random_start(
    x_nat: torch.Tensor, eps: float | torch.Tensor, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    """A random point of the eps-ball around ``x_nat`` [B, ...], clamped to [0, 1] (torchattacks'
    starts): linf ``clamp(x + U(-eps, eps), 0, 1)``; l2 a random direction scaled to a uniform
    radius in [0, eps]. ``generator`` makes it reproducible."""
    g = generator
    if norm == "linf":
        if isinstance(eps, torch.Tensor):
            noise = (torch.rand(x_nat.shape, generator=g, device=x_nat.device, dtype=x_nat.dtype) * 2 - 1)
            noise = noise * _per_sample(eps, x_nat)
        else:
            noise = torch.empty_like(x_nat).uniform_(-eps, eps, generator=g)
    else:
        direction = torch.randn(x_nat.shape, generator=g, device=x_nat.device, dtype=x_nat.dtype)
        n = direction.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x_nat.dim() - 1)))
        r = torch.rand(n.shape, generator=g, device=x_nat.device, dtype=x_nat.dtype)
        noise = direction * (r / n * _per_sample(eps, n))
    return torch.clamp(x_nat + noise, 0, 1)
