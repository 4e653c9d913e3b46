"""Numeric constants and the accumulation-dtype rule, shared by every layer (kernels included).

A leaf module: it imports nothing from the package, so the Triton kernels can use it too.
"""
from __future__ import annotations

import math

import torch

NORM_EPS = 1e-12  # F.normalize's default: x / max(||x||, eps)
LOG2E = math.log2(math.e)  # exp(x) = exp2(x * LOG2E): kernels fold 1/tau and LOG2E into one scale
LN2 = math.log(2.0)  # log(x) = log2(x) * LN2


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
