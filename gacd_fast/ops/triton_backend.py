"""Backend "triton": the fused kernels of ``gacd_fast.kernels`` (kernels/ in the repository).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, slow:
tests only; "auto" never picks it). float64 inputs use the torch implementations (the kernels
compute in fp32): ``chunked.info_nce_rows`` and the reference ops.
Inputs are validated by ``gacd_fast.functional`` before they get here.
"""
from __future__ import annotations

import os

import torch

from . import chunked, reference

try:
    import triton  # noqa: F401

    from gacd_fast.kernels import info_nce as _k_nce
    from gacd_fast.kernels import pgd as _k_pgd
    from gacd_fast.kernels import similarity as _k_sim

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing or broken: the backend reports it as unavailable
    _IMPORT_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"

__all__ = ["info_nce_rows", "normalize", "cosine_similarity", "pgd_step_", "pgd_random_start", "unavailable_reason"]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device | None, *, auto: bool = False) -> str | None:
    """None when the Triton kernels can run on ``device`` (None: anywhere), else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device is None:
        if torch.cuda.is_available() or _interpret():
            return None
        return "no CUDA GPU is available (and TRITON_INTERPRET=1 is not set)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if not _interpret():
            return "Triton needs CUDA tensors; CPU tensors run only under TRITON_INTERPRET=1 (tests)"
        if auto:
            return "the Triton CPU interpreter is for tests only; 'auto' does not pick it"
        return None
    return f"Triton does not run on {device.type} tensors"


def info_nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: torch.Tensor | None,
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """Unweighted per-row loss [B] (float32; float64 for float64 inputs), see reference.info_nce_rows."""
    if query.dtype == torch.float64:  # the kernels accumulate in fp32: float64 uses the torch version
        return chunked.info_nce_rows(query, positive, negatives, neg_index, temperature, normalize)
    return _k_nce.info_nce_rows(query, positive, negatives, neg_index, temperature, normalize)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] rows / max(||row||, 1e-12) in ``x.dtype``."""
    if x.dtype == torch.float64:
        return reference.normalize(x)
    return _k_sim.normalize(x)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] -> [B] float32 (float64 for float64 inputs)."""
    if a.dtype == torch.float64:
        return reference.cosine_similarity(a, b)
    return _k_sim.cosine_similarity(a, b)


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
    """One PGD step in place on ``x_adv`` [B, ...]; returns it (float64 handled by the reference)."""
    return _k_pgd.pgd_step_(x_adv, grad, x_nat, alpha, eps, clip_min, clip_max, norm)


def pgd_random_start(
    x_nat: torch.Tensor, eps: float | torch.Tensor, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Fused linf random start clamp(x + U(-eps, eps), 0, 1) (Philox keyed on a seed drawn from
    ``generator``, so reproducible for a given generator state); l2 and float64 use the reference."""
    if norm != "linf" or x_nat.dtype == torch.float64:
        return reference.pgd_random_start(x_nat, eps, norm, generator)
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=device))
    return _k_pgd.linf_random_start(x_nat, eps, seed)
