"""Backend "cext": the C++ (CPU) and CUDA kernels of csrc/, as ``torch.ops.gacd_fast.*``.

The ops are defined here, at import, from the op modules' contracts (schema, fake that checks
shapes, autograd formula: ``contract.py``), and so are the entries (``entries.py``); the library
built from csrc/ registers only their kernels (``TORCH_LIBRARY_IMPL``, CPU in csrc/cpu/<op>.cpp,
CUDA in csrc/cuda/<op>.cu). Building and loading it is ``cext_build.py``; the registry loads it through :func:`prepare` before handing out an op, outside
any torch.compile trace. "auto" uses this backend only when the library needs no compiling;
``backend="cext"`` compiles it on first use and says so on stderr first.
"""
from __future__ import annotations

import torch

from . import cext_build
from .cext_build import NAMESPACE, find_cuda_home, is_built, is_loaded, load
from .entries import compiled_entries, define_compiled


def _ensure() -> None:
    """A direct call of an op function (not through the registry) loads, or builds, the library."""
    if not is_loaded():
        load()


define_compiled("cext", NAMESPACE)
# The kernels take float64 too. The ops without kernels here (the random start: torch's RNG draws
# exactly the torch backend's, and torchattacks', start) run the torch backend's implementation.
_ENTRIES = compiled_entries("cext", NAMESPACE, native_float64=True, before=_ensure)
globals().update(_ENTRIES)  # info_nce_rows, l2_normalize, cosine_similarity, pgd_step_, pgd_random_start
__all__ = [*_ENTRIES, "unavailable_reason", "prepare", "load", "is_loaded", "is_built", "NAMESPACE"]


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
