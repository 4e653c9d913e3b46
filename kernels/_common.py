"""Shared launch helpers of the Triton kernels: interpreter detection, precision setting, sizes.

Precision of fp32 ``tl.dot`` (``input_precision``): "ieee" (exact, the default) or "tf32" (fast,
~1e-3 relative error in the logits), chosen by the environment variable ``GACD_FAST_TF32=1`` or at
run time with :func:`set_tf32`. Half-precision (fp16/bf16) tiles are unaffected.
"""
from __future__ import annotations

import os

import torch
import triton

_tf32: bool | None = None


def interpreting() -> bool:
    """True when kernels run under the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def set_tf32(enabled: bool | None) -> None:
    """Use TF32 for fp32 ``tl.dot`` tiles (True), IEEE fp32 (False), or follow $GACD_FAST_TF32 (None)."""
    global _tf32
    _tf32 = enabled


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for a ``tl.dot`` over tiles of ``dtype`` (ignored by Triton for fp16/bf16)."""
    tf32 = _tf32 if _tf32 is not None else os.environ.get("GACD_FAST_TF32", "0") == "1"
    return "tf32" if (tf32 and dtype == torch.float32 and not interpreting()) else "ieee"


def upcast_dot(dtype: torch.dtype) -> bool:
    """bf16 ``tl.dot`` silently returns garbage in the interpreter: upcast its tiles to fp32 there."""
    return dtype == torch.bfloat16 and interpreting()


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """next_power_of_2(n) clamped to [lo, hi]."""
    v = max(lo, triton.next_power_of_2(max(1, int(n))))
    return min(v, hi) if hi is not None else v


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere): sizes the split-K grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
