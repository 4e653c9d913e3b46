"""Linear CKA (Kornblith et al. 2019): similarity of two representations of the same inputs."""
from __future__ import annotations

import math

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F) for X [N, D1], Y [N, D2]
    (columns centred), in float64. 1 for X = Y; invariant to orthogonal maps and isotropic
    scaling of either side; 0 when either side is constant; NaN when either holds NaN or inf (a
    diverged model's features are not "dissimilar", they are no features)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs X [N, D1] and Y [N, D2] with the same N, got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.detach().double().cpu()
    y = y.detach().double().cpu()
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        return float("nan")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).pow(2).sum()
    denom = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    if not (math.isfinite(float(cross)) and math.isfinite(float(denom))):
        return float("nan")  # features too large for float64's squares
    return float(cross / denom) if float(denom) > 0 else 0.0
