"""Backend "triton": the fused kernels of ``gacd_fast.kernels`` (kernels/ in the repository).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, slow:
tests only; "auto" never picks it). The ops are defined in the ``gacd_triton`` namespace from the
op modules' contracts (schema, fake, autograd: see ``contract.py``); this module registers only the
kernels. The kernels compute in fp32, so float64 inputs go to the torch backend's implementations:
that policy is here, not in the kernels. Inputs are validated by ``gacd_fast.functional``.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import chunked, cosine_similarity as cosine_op, info_nce as info_nce_op, l2_normalize as normalize_op
from . import pgd_random_start as start_op, pgd_step as step_op

NAMESPACE = "gacd_triton"

try:
    import triton  # noqa: F401

    from gacd_fast.kernels import info_nce as _k_nce
    from gacd_fast.kernels._common import dot_precision, interpreting
    from gacd_fast.kernels import pgd as _k_pgd
    from gacd_fast.kernels import similarity as _k_sim

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing or broken: the backend reports it as unavailable
    _IMPORT_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"

__all__ = [
    "info_nce_rows", "l2_normalize", "cosine_similarity", "pgd_step_", "pgd_random_start", "unavailable_reason",
    "NAMESPACE",
]


def _register() -> None:
    """Define every compiled op in ``gacd_triton`` and register its kernel for CPU (interpreter) and CUDA."""
    kernels = {
        info_nce_op.FORWARD: _k_nce.forward,
        info_nce_op.BACKWARD: _k_nce.backward,
        normalize_op.FORWARD: _k_sim.l2_normalize,
        normalize_op.BACKWARD: _k_sim.l2_normalize_grad,
        cosine_op.FORWARD: _k_sim.cosine_similarity,
        cosine_op.BACKWARD: _k_sim.cosine_similarity_grad,
        step_op.STEP: _k_pgd.pgd_step_,
        start_op.LINF_START: _k_pgd.linf_random_start,
    }
    for op, kernel in kernels.items():
        op.define(NAMESPACE)
        torch.library.register_kernel(op.qualname(NAMESPACE), ("cpu", "cuda"), kernel)


if _IMPORT_ERROR is None:
    _register()


def unavailable_reason(device: torch.device | None, *, auto: bool = False) -> str | None:
    """None when the Triton kernels can run on ``device`` (None: anywhere), else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device is None:
        if torch.cuda.is_available() or interpreting():
            return None
        return "no CUDA GPU is available (and TRITON_INTERPRET=1 is not set)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if not interpreting():
            return "Triton needs CUDA tensors; CPU tensors run only under TRITON_INTERPRET=1 (tests)"
        if auto:
            return "the Triton CPU interpreter is for tests only; 'auto' does not pick it"
        return None
    return f"Triton does not run on {device.type} tensors"


def self_check_tolerance(dtype: torch.dtype) -> tuple[float, float] | None:
    """The first-use check's (atol, rtol) where this backend's precision mode differs from the
    conformance table's: fp32 dots in TF32 (``GACD_FAST_TF32=1``) err like half-precision ones."""
    if _IMPORT_ERROR is None and dtype == torch.float32 and dot_precision(dtype) == "tf32":
        return (5e-3, 5e-3)
    return None


def info_nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: Optional[torch.Tensor],
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """Unweighted per-row loss [B] (float32; float64 for float64 inputs), see ``info_nce.reference``."""
    if query.dtype == torch.float64:
        return chunked.info_nce_rows(query, positive, negatives, neg_index, temperature, normalize)
    return info_nce_op.compiled(NAMESPACE, query, positive, negatives, neg_index, temperature, normalize)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] rows / max(||row||, NORM_EPS) in ``x.dtype``."""
    if x.dtype == torch.float64:
        return normalize_op.reference(x)
    return normalize_op.compiled(NAMESPACE, x)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] -> [B] float32 (float64 for float64 inputs)."""
    if a.dtype == torch.float64:
        return cosine_op.reference(a, b)
    return cosine_op.compiled(NAMESPACE, a, b)


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
    """One PGD step in place on ``x_adv`` [B, ...]; returns it."""
    if x_adv.dtype == torch.float64:
        return step_op.reference(x_adv, grad, x_nat, alpha, eps, clip_min, clip_max, norm)
    return step_op.compiled(NAMESPACE, x_adv, grad, x_nat, alpha, eps, clip_min, clip_max, norm)


def pgd_random_start(
    x_nat: torch.Tensor, eps: float | torch.Tensor, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Fused linf random start clamp(x + U(-eps, eps), 0, 1) (Philox keyed on a seed drawn from
    ``generator``, so reproducible for a given generator state); l2 and float64 use the reference."""
    if norm != "linf" or x_nat.dtype == torch.float64:
        return start_op.reference(x_nat, eps, norm, generator)
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=device))
    return start_op.compiled_linf(NAMESPACE, x_nat, eps, seed)
