"""The functional API: validate inputs, pick a backend, apply weights and reduction.

Backends compute the unweighted per-row loss (``info_nce_rows``); weighting and reduction are
B-sized and done once here for all of them. NaN in the inputs propagates to the result (it is
never zeroed); see README's "What bad input gets" for the whole policy.
"""
from __future__ import annotations

import torch

from . import backends
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_int,
    check_no_grad,
    check_nonempty,
    check_nonneg_values,
    check_option,
    check_per_sample,
    check_real,
    check_same_device,
    check_same_dtype,
    check_shape,
    check_temperature,
    check_tensor,
)

REDUCTIONS = ("none", "sum", "mean")
NORMS = ("linf", "l2")

__all__ = [
    "info_nce", "nce_loss", "cosine_similarity", "l2_normalize", "pgd_step_", "pgd_random_start", "weighted_reduce",
]


def weighted_reduce(loss: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Apply per-sample weights (constants) and a reduction to a per-row loss [B].

    "none" -> w*l [B]; "sum" -> sum w*l; "mean" -> sum w*l / sum w, which is 0 (with zero
    gradients) when sum w == 0.
    """
    if weights is None:
        if reduction == "none":
            return loss
        return loss.sum() if reduction == "sum" else loss.mean()
    w = weights.detach().to(loss.dtype)
    wl = w * loss
    if reduction == "none":
        return wl
    total = wl.sum()
    if reduction == "sum":
        return total
    w_sum = w.sum()
    return total / torch.where(w_sum == 0, torch.ones_like(w_sum), w_sum)


def _check_contrastive_inputs(query, positive, negatives, temperature, weights, neg_index, normalize, reduction):
    check_tensor("query", query, ndim=2)
    check_tensor("positive", positive, ndim=2)
    check_tensor("negatives", negatives, ndim=2)
    check_nonempty("query", query, (0, 1))
    check_shape("positive", positive, query.shape, "same as query [B, D]")
    check_nonempty("negatives", negatives, (0,))
    if negatives.shape[1] != query.shape[1]:
        raise ValueError(
            f"negatives must have D={query.shape[1]} columns like query, got shape {tuple(negatives.shape)}"
        )
    check_same_dtype(query=query, positive=positive, negatives=negatives)
    temperature = check_temperature(temperature)
    if weights is not None:
        check_tensor("weights", weights, ndim=1)
        check_shape("weights", weights, (query.shape[0],), "one weight per query row")
    if neg_index is not None:
        check_tensor("neg_index", neg_index, ndim=2, dtypes=INDEX_DTYPES)
        check_shape("neg_index", neg_index, (query.shape[0], neg_index.shape[1]), "[B, M]")
        check_nonempty("neg_index", neg_index, (1,))
    check_same_device(query=query, positive=positive, negatives=negatives, weights=weights, neg_index=neg_index)
    if weights is not None:
        check_nonneg_values("weights", weights)
    if neg_index is not None:
        check_index_range("neg_index", neg_index, negatives.shape[0], "rows of negatives")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    check_option("reduction", reduction, REDUCTIONS)
    return temperature


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    temperature: float = 0.07,
    weights: torch.Tensor | None = None,
    neg_index: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted InfoNCE of each query against its positive and a set of negatives.

    Args:
        query, positive: [B, D] float16/bfloat16/float32/float64, same dtype and device.
        negatives: [K, D]: a bank shared by every row, or the rows ``neg_index`` picks.
        temperature: tau > 0 with 1/tau finite in float32 (a Python or numpy real).
        weights: [B] per-sample weights >= 0, constants (never differentiated); default all ones.
        neg_index: [B, M] int32/int64 in [0, K): row i's negatives are ``negatives[neg_index[i]]``.
            The range is checked unless value checks are off (:func:`gacd_fast.set_value_checks`):
            then an out-of-range index is undefined behaviour on the triton backend and on CUDA.
        normalize: L2-normalise rows of query, positive and negatives first (eps 1e-12).
        reduction: "none" -> [B] w_i l_i; "sum"; "mean" -> sum w l / sum w (0 when sum w == 0).
        backend: None (the current selection), "auto" or a backend name.

    Returns:
        float32 loss (float64 for float64 inputs), l_i = logsumexp({s_pos_i} U {q_i.n/tau}) - s_pos_i
        with s_pos_i = q_i.p_i/tau (torch.logsumexp's rules for infinite logits). Gradients flow to
        every input that requires grad; second-order gradients (create_graph=True) only on the
        torch backend with negatives that require grad, elsewhere they are a RuntimeError.
    """
    temperature = _check_contrastive_inputs(
        query, positive, negatives, temperature, weights, neg_index, normalize, reduction
    )
    _, fn = backends.resolve("info_nce_rows", query.device, backend, query.dtype)
    rows = fn(query, positive, negatives, neg_index, temperature, normalize)
    return weighted_reduce(rows, weights, reduction)


def nce_loss(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    *,
    num_data: int,
    temperature: float = 0.07,
    normalizer: float = 1.0,
    eps: float = 0.0,
    weights: torch.Tensor | None = None,
    neg_index: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """CRD's NCE loss (RepDistiller's ContrastLoss on ContrastMemory's scores), weighted.

    Same arguments as :func:`info_nce` plus ``num_data`` (the dataset size n of CRD's noise
    distribution 1/n), ``normalizer`` (CRD's constant Z: a score's probability is exp(s/tau) / Z)
    and ``eps`` (CRD's 1e-7 in the denominators). With K negatives per row and c = K / n:
    l_i = -log(P_pos / (P_pos + c + eps)) - sum_k log(c / (P_k + c + eps)). The defaults (Z = 1,
    eps = 0) give the critic h(s) = sigmoid(s/tau - log c). Only the torch backend implements it
    (it holds the B x K scores).
    """
    temperature = _check_contrastive_inputs(
        query, positive, negatives, temperature, weights, neg_index, normalize, reduction
    )
    num_data = check_int("num_data", num_data, minimum=1)
    normalizer = check_real("normalizer", normalizer, positive=True)
    eps = check_real("eps", eps, nonneg=True)
    _, fn = backends.resolve("nce_rows", query.device, backend, query.dtype)
    rows = fn(query, positive, negatives, neg_index, temperature, normalize, num_data, normalizer, eps)
    return weighted_reduce(rows, weights, reduction)


def l2_normalize(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """[N, D] -> [N, D] rows divided by max(||row||_2, NORM_EPS = 1e-12), in ``x.dtype`` (computed in float32/64,
    overflow-safe: any finite row normalises, whatever its magnitude). N, D >= 1."""
    check_tensor("x", x, ndim=2)
    check_nonempty("x", x, (0, 1))
    _, fn = backends.resolve("l2_normalize", x.device, backend, x.dtype)
    return fn(x)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """[B, D], [B, D] -> [B] cosine of L2-normalised rows; float32 (float64 for float64 inputs). B, D >= 1."""
    check_tensor("a", a, ndim=2)
    check_tensor("b", b, ndim=2)
    check_nonempty("a", a, (0, 1))
    check_shape("b", b, a.shape, "same as a")
    check_same_dtype(a=a, b=b)
    check_same_device(a=a, b=b)
    _, fn = backends.resolve("cosine_similarity", a.device, backend, a.dtype)
    return fn(a, b)


def pgd_step_(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    *,
    alpha: float | torch.Tensor,
    eps: float | torch.Tensor,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    norm: str = "linf",
    backend: str | None = None,
) -> torch.Tensor:
    """One projected gradient ascent step, in place on ``x_adv``; returns ``x_adv``. A no-grad op.

    Args:
        x_adv, grad, x_nat: [B, ...] images of one float dtype on one device. None of them may
            require grad (ValueError naming it): x_adv is written in place and autograd does not
            follow the step; pass ``.detach()``-ed tensors.
        alpha, eps: step size and radius, finite reals or per-sample [B] tensors (not requiring
            grad); eps >= 0.
        clip_min, clip_max: the valid pixel range.
        norm: "linf": x_adv <- clamp(x_nat + clamp(x_adv + alpha*sign(grad) - x_nat, -eps, eps),
            clip_min, clip_max) in torchattacks' order; "l2": step along grad/||grad||, project
            onto the L2 ball of radius eps, clamp.

    NaN policy: a NaN element of ``grad`` takes no step (linf: sign(NaN) = 0, as torch.sign;
    l2: it counts as 0 in the norm and the direction). The l2 norm is overflow-safe: any finite
    gradient gives a unit step; +-inf elements give the limit direction (the inf elements share
    the step, finite ones get none). NaN in x_adv or x_nat propagates to the result.
    """
    check_tensor("x_adv", x_adv, min_ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("grad", grad)
    check_tensor("x_nat", x_nat)
    check_nonempty("x_adv", x_adv, range(x_adv.dim()))
    check_shape("grad", grad, x_adv.shape, "same as x_adv")
    check_shape("x_nat", x_nat, x_adv.shape, "same as x_adv")
    check_same_dtype(x_adv=x_adv, grad=grad, x_nat=x_nat)
    check_same_device(x_adv=x_adv, grad=grad, x_nat=x_nat)
    if x_adv.requires_grad:
        raise ValueError("x_adv is updated in place and must not require grad; pass x_adv.detach()")
    check_no_grad("grad", grad)
    check_no_grad("x_nat", x_nat)
    batch = x_adv.shape[0]
    alpha = check_per_sample("alpha", alpha, batch, x_adv.device)
    eps = check_per_sample("eps", eps, batch, x_adv.device, nonneg=True)
    clip_min = check_real("clip_min", clip_min)
    clip_max = check_real("clip_max", clip_max)
    if clip_min > clip_max:
        raise ValueError(f"clip_min must be <= clip_max, got clip_min={clip_min}, clip_max={clip_max}")
    check_option("norm", norm, NORMS)
    _, fn = backends.resolve("pgd_step_", x_adv.device, backend, x_adv.dtype)
    return fn(x_adv, grad, x_nat, alpha, eps, clip_min, clip_max, norm)


def pgd_random_start(
    x_nat: torch.Tensor,
    *,
    eps: float | torch.Tensor,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """A random start in the eps-ball around images ``x_nat`` [B, ...] in [0, 1], clamped to [0, 1].

    linf: ``clamp(x + U(-eps, eps), 0, 1)``; l2: a uniform radius in [0, eps] along a random
    direction. eps: a Python float or per-sample [B] tensor, >= 0. Reproducible for a given
    ``generator`` state (the torch backend draws exactly torchattacks' start from it; the triton
    backend draws its Philox seed from it).
    """
    check_tensor("x_nat", x_nat, min_ndim=1)
    check_nonempty("x_nat", x_nat, range(x_nat.dim()))
    eps = check_per_sample("eps", eps, x_nat.shape[0], x_nat.device, nonneg=True)
    check_option("norm", norm, NORMS)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _, fn = backends.resolve("pgd_random_start", x_nat.device, backend, x_nat.dtype)
    return fn(x_nat, eps, norm, generator)
