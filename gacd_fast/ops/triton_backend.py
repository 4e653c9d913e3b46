"""Backend "triton": the fused kernels of ``gacd_fast.kernels`` (kernels/ in the repository).

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1, slow:
tests only; "auto" never picks it). The ops are defined in the ``gacd_triton`` namespace from the
op modules' contracts (schema, fake, autograd: see ``contract.py``); this module registers only the
kernels, and builds its entries from the ops' contracts (``entries.py``). The kernels compute in
fp32, so float64 inputs go to the torch backend's implementations: that policy is declared here,
not in the kernels. Inputs are validated by ``gacd_fast.functional``.
"""
from __future__ import annotations

import importlib

import torch

from .entries import compiled_entries, define_compiled

NAMESPACE = "gacd_triton"

try:
    import triton  # noqa: F401

    from gacd_fast.kernels._common import dot_precision, interpreting

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # triton missing or broken: the backend reports it as unavailable
    _IMPORT_ERROR = f"triton could not be imported ({type(exc).__name__}: {exc})"


def _register() -> None:
    """Define the compiled ops with Triton kernels in ``gacd_triton`` and register each one's
    launcher, ``gacd_fast.kernels.<op>.<operator name>``, for CPU (interpreter) and CUDA."""
    for op_name, compiled in define_compiled("triton", NAMESPACE):
        launchers = importlib.import_module(f"gacd_fast.kernels.{op_name}")
        torch.library.register_kernel(compiled.qualname(NAMESPACE), ("cpu", "cuda"), getattr(launchers, compiled.name))


if _IMPORT_ERROR is None:
    _register()

# The kernels compute in fp32: float64 inputs run the torch backend's implementations.
_ENTRIES = compiled_entries("triton", NAMESPACE, native_float64=False)
globals().update(_ENTRIES)  # info_nce_rows, l2_normalize, cosine_similarity, pgd_step_, pgd_random_start
__all__ = [*_ENTRIES, "unavailable_reason", "self_check_tolerance", "NAMESPACE"]


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
