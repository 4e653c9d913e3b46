"""Backend "cext": the C++ (CPU) and CUDA kernels of csrc/, as ``torch.ops.gacd_fast.*``.

The ops are defined here, at import, from the op modules' contracts (schema, fake that checks
shapes, autograd formula: ``contract.py``); the library built from csrc/ registers only their
kernels (``TORCH_LIBRARY_IMPL``, CPU in csrc/cpu/, CUDA in csrc/cuda/). Building and loading it is
``cext_build.py``; the registry loads it through :func:`prepare` before handing out an op, outside
any torch.compile trace. "auto" uses this backend only when the library needs no compiling;
``backend="cext"`` compiles it on first use and says so on stderr first.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import cext_build
from . import cosine_similarity as cosine_op
from . import info_nce as info_nce_op
from . import l2_normalize as normalize_op
from . import pgd_random_start as start_op
from . import pgd_step as step_op
from .cext_build import NAMESPACE, find_cuda_home, is_built, is_loaded, load

__all__ = [
    "info_nce_rows", "l2_normalize", "cosine_similarity", "pgd_step_", "pgd_random_start", "unavailable_reason",
    "prepare", "load", "is_loaded", "is_built", "NAMESPACE",
]

for _op in (*info_nce_op.OPS, *normalize_op.OPS, *cosine_op.OPS, *step_op.OPS):
    _op.define(NAMESPACE)

# The random start is the reference's: torch's RNG draws exactly the torch backend's (and
# torchattacks') start, one elementwise pass that needs no kernel of its own.
pgd_random_start = start_op.reference


def unavailable_reason(device: torch.device | None, *, auto: bool = False) -> str | None:
    """Why the extension cannot run for ``device`` (None: it can).

    auto=True: only if it is already built (an "auto" call never starts a compile).
    """
    kind = device.type if device is not None else None
    if kind not in (None, "cpu", "cuda"):
        return f"the C++/CUDA extension runs on cpu and cuda tensors, not {kind}"
    if cext_build.error() is not None:
        return cext_build.error()
    if kind == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA, so the extension has no CUDA kernels"
        if is_loaded() and not cext_build.has_kernel("info_nce_forward", "CUDA"):
            return "the loaded extension was built without CUDA kernels (no CUDA toolkit/nvcc at build time)"
        if not is_loaded() and not auto and find_cuda_home() is None and cext_build.aot_library() is None:
            return "no CUDA toolkit found to build the CUDA kernels (set CUDA_HOME or put nvcc on PATH)"
    if auto and not is_built():
        return "the C++ extension is not built yet (backend='cext' builds it on first use; or run `make ext`)"
    if not is_loaded() and not is_built():
        return cext_build.build_problem()
    return None


def prepare(auto: bool) -> None:
    """Load the library before the registry hands out an op (outside any torch.compile trace: the
    registry calls this from its constant-folded choice). ``auto``: never compile (RuntimeError when
    there is nothing built to load); explicit ``backend="cext"``: compile on first use."""
    if not is_loaded():
        load(build=not auto)


def _ensure() -> None:
    """A direct call of an op function (not through the registry) loads, or builds, the library."""
    if not is_loaded():
        load()


def info_nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: Optional[torch.Tensor],
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """Unweighted per-row loss [B] (float32; float64 for float64 inputs), see ``info_nce.reference``.

    On CPU the bank's part of dq shares the forward's pass over the bank; on CUDA it is the
    row-owned backward kernel run with g = 1.
    """
    _ensure()
    return info_nce_op.compiled(NAMESPACE, query, positive, negatives, neg_index, temperature, normalize)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] rows divided by max(||row||, NORM_EPS), in x.dtype."""
    _ensure()
    return normalize_op.compiled(NAMESPACE, x)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] -> [B] cosine of the rows, float32 (float64 for float64 inputs)."""
    _ensure()
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
    """One PGD step in place on x_adv [B, ...] (see ``pgd_step.reference``); returns x_adv."""
    _ensure()
    return step_op.compiled(NAMESPACE, x_adv, grad, x_nat, alpha, eps, clip_min, clip_max, norm)
