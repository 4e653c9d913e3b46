"""Inputs shared by the conformance module and the backend-specific tests: InfoNCE rows and PGD
images. Values come from the global RNG (tests/conftest.py seeds it before every test) in float64
and are then rounded to the dtype, so an oracle fed ``t.double()`` sees exactly the tested inputs."""
from __future__ import annotations

import torch


def info_nce_inputs(B: int, K: int, D: int, M: int | None, dtype: torch.dtype = torch.float32, *,
                    idx_dtype: torch.dtype = torch.int64, scale: float = 1.0,
                    grad: tuple[bool, bool, bool] = (False, False, False), device: str | torch.device = "cpu"):
    """query, positive [B, D], negatives [K, D] of ``dtype`` (positives correlate with their
    queries) and neg_index [B, M] of ``idx_dtype`` in [0, K), or None when M is None.
    ``grad``: which of query, positive, negatives require grad. ``scale`` multiplies every row
    (small rows keep unnormalised logits moderate)."""
    q = torch.randn(B, D, dtype=torch.float64)
    p = q + 0.5 * torch.randn(B, D, dtype=torch.float64)
    n = torch.randn(K, D, dtype=torch.float64)
    q, p, n = (scale * t for t in (q, p, n))
    idx = None if M is None else torch.randint(0, K, (B, M), dtype=idx_dtype, device=device)
    q, p, n = (t.to(device, dtype).requires_grad_(r) for t, r in zip((q, p, n), grad))
    return q, p, n, idx


def pgd_images(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *, zero_grad_sample: bool = False,
               device: str | torch.device = "cpu"):
    """x_adv, grad, x_nat [B, ...] of ``dtype``: images in [0, 1], x_adv within 0.05 of x_nat, a
    gradient with every 7th element 0 (sign(0) = 0) and, with ``zero_grad_sample``, the last sample's
    gradient all 0 (l2: no direction, no step)."""
    x_nat = torch.rand(shape, dtype=torch.float64)
    x_adv = torch.clamp(x_nat + (torch.rand(shape, dtype=torch.float64) - 0.5) * 0.1, 0, 1)
    grad = torch.randn(shape, dtype=torch.float64)
    grad.view(-1)[::7] = 0
    if zero_grad_sample:
        grad[-1] = 0
    return x_adv.to(device, dtype), grad.to(device, dtype), x_nat.to(device, dtype)
