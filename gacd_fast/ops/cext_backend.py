"""Backend "cext": the C++ (CPU) and CUDA extension built from csrc/.

The ops are defined once in C++ (``TORCH_LIBRARY(gacd_fast, m)``, csrc/ops.cpp) with CPU kernels
(csrc/cpu/) and CUDA kernels (csrc/cuda/, compiled only against a CUDA build of torch). This module
loads the library, registers each op's fake kernel and autograd formula with ``torch.library`` (so
the ops run under autograd, ``torch.compile`` and ``torch.library.opcheck``), and wraps them in the
backend contract of :mod:`gacd_fast.backends`.

Where the library comes from, first that applies: already loaded in this process; an ahead-of-time
build installed as ``gacd_fast._C`` (``GACD_FAST_BUILD_EXT=1 pip install --no-build-isolation .``);
a JIT build with ninja into torch's extension cache (``TORCH_EXTENSIONS_DIR`` or
~/.cache/torch_extensions). "auto" uses this backend only when one of those needs no compiling;
``backend="cext"`` compiles on first use and says so on stderr first.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

from .chunked import SECOND_ORDER_ERROR
# The random start is the reference's: torch's RNG draws exactly the torch backend's (and
# torchattacks') start, one elementwise pass that needs no kernel of its own.
from .reference import acc_dtype, pgd_random_start

__all__ = [
    "info_nce_rows", "normalize", "cosine_similarity", "pgd_step_", "pgd_random_start", "unavailable_reason",
    "load", "is_loaded", "is_built", "source_dir", "sources", "find_cuda_home",
]

_lock = threading.RLock()
_loaded: str | None = None  # how the library came: "aot", "jit" or "preloaded"
_error: str | None = None  # why a build or load failed (kept so later calls fail fast)
_registered = False

# -ffp-contract=off: no FMA contraction, pgd_step_ must match eager bitwise; -fno-trapping-math
# (results unchanged) lets the compiler vectorise the softmax loops; -fopenmp: at::parallel_for is
# inlined from ATen's headers as an OpenMP region, which runs serially when compiled without it.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3"]  # the C++ standard: torch picks the one its headers need


# ----------------------------------------------------------------------------------------- build
def source_dir() -> Path:
    """The folder holding ops.cpp, cpu/ and cuda/: gacd_fast.csrc when installed, else ./csrc."""
    spec = importlib.util.find_spec("gacd_fast.csrc")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parents[2] / "csrc"


def sources(with_cuda: bool) -> list[str]:
    """Source files of the extension: the C++ ones, plus the .cu ones when ``with_cuda``."""
    root = source_dir()
    files = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def _build_inputs(with_cuda: bool) -> list[Path]:
    """Every file a build depends on (sources and headers), for the staleness check."""
    root = source_dir()
    files = [Path(f) for f in sources(with_cuda)] + [root / "common.h"]
    if with_cuda:
        files += list((root / "cuda").glob("*.cuh"))
    return files


@lru_cache(maxsize=None)
def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME/$CUDA_PATH, else where the ``nvcc`` on PATH really lives.

    The nvcc on PATH may be a wrapper script, so ``nvcc --dryrun`` is asked for its TOP folder.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    real = Path(os.path.realpath(nvcc)).parent.parent
    if (real / "include" / "cuda_runtime.h").exists():
        return str(real)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cu"
        src.write_text("int main() { return 0; }\n")
        try:
            out = subprocess.run([nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.normpath(m.group(1).strip()) if m else None


def _with_cuda() -> bool:
    """Build the .cu sources too: only against a CUDA build of torch with a CUDA toolkit."""
    return torch.version.cuda is not None and find_cuda_home() is not None


def _jit_name(with_cuda: bool) -> str:
    return "gacd_fast_cext_cuda" if with_cuda else "gacd_fast_cext"


def _jit_library(with_cuda: bool) -> Path:
    from torch.utils import cpp_extension

    name = _jit_name(with_cuda)
    return Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"


def _aot_origin() -> str | None:
    try:
        spec = importlib.util.find_spec("gacd_fast._C")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    # an in-place build older than the sources beside it is stale: fall back to the JIT build
    with_cuda = torch.version.cuda is not None
    return spec.origin if _fresh(Path(spec.origin), with_cuda) else None


def _ops_present() -> bool:
    try:
        torch.ops.gacd_fast.info_nce_forward.default
        return True
    except (AttributeError, RuntimeError):
        return False


def is_loaded() -> bool:
    """True once the library's ops are registered in this process."""
    return _loaded is not None


def is_built() -> bool:
    """True when loading needs no compiling: loaded, installed ahead of time, or a fresh JIT build."""
    if _loaded is not None or _ops_present() or _aot_origin() is not None:
        return True
    try:
        with_cuda = _with_cuda()
        return _fresh(_jit_library(with_cuda), with_cuda)
    except (OSError, ValueError, AttributeError):  # _get_build_directory is private to torch
        return False


def _fresh(lib: Path, with_cuda: bool) -> bool:
    """``lib`` exists and is newer than every source it is built from (when those are present)."""
    if not lib.exists():
        return False
    inputs = [p for p in _build_inputs(with_cuda) if p.exists()]
    return not inputs or lib.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def _build_problem() -> str | None:
    """What stops a JIT build here (None: nothing)."""
    from torch.utils import cpp_extension

    if not Path(source_dir(), "ops.cpp").is_file():
        return f"the extension's sources are missing (looked in {source_dir()})"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja), so the extension cannot be built"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found on PATH)"
    return None


def load(*, verbose: bool = False) -> str:
    """Load the extension, compiling it first if needed (announced on stderr); returns how it came.

    Raises RuntimeError with the reason when it cannot be built or loaded.
    """
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if _error is not None:
            raise RuntimeError(_error)
        try:
            if _ops_present():
                how = "preloaded"
            elif (origin := _aot_origin()) is not None:
                torch.ops.load_library(origin)
                how = "aot"
            else:
                _jit_build(verbose)
                how = "jit"
            _register_python_side()
        except Exception as exc:  # keep the reason: a failed build is not retried on every call
            _error = f"building/loading the gacd_fast C++ extension failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(_error) from exc
        _loaded = how  # set last: other threads see the ops only once fake/autograd are registered
        return _loaded


def _jit_build(verbose: bool) -> None:
    problem = _build_problem()
    if problem is not None:
        raise RuntimeError(problem)
    with_cuda = _with_cuda()
    from torch.utils import cpp_extension

    if with_cuda:
        home = find_cuda_home()
        os.environ.setdefault("CUDA_HOME", home)
        # cpp_extension guesses its CUDA_HOME at import (from a wrapper nvcc's folder it can be wrong)
        current = cpp_extension.CUDA_HOME
        if current is None or not Path(current, "include", "cuda_runtime.h").exists():
            cpp_extension.CUDA_HOME = home
    name = _jit_name(with_cuda)
    if not is_built():
        print(
            f"gacd_fast: compiling the C++{'/CUDA' if with_cuda else ''} extension '{name}' "
            f"(first use only, about a minute; cached in {Path(_jit_library(with_cuda)).parent})...",
            file=sys.stderr, flush=True,
        )
    cpp_extension.load(
        name=name,
        sources=sources(with_cuda),
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        extra_cuda_cflags=CUDA_FLAGS if with_cuda else None,
        is_python_module=False,
        verbose=verbose,
    )


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"gacd_fast::{op}", key))
    except Exception:
        return False


def unavailable_reason(device: torch.device | None, *, auto: bool = False) -> str | None:
    """Why the extension cannot run for ``device`` (None: it can).

    auto=True: only if it is already built (an "auto" call never starts a compile).
    """
    kind = device.type if device is not None else None
    if kind not in (None, "cpu", "cuda"):
        return f"the C++/CUDA extension runs on cpu and cuda tensors, not {kind}"
    if _error is not None:
        return _error
    if kind == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA, so the extension has no CUDA kernels"
        if _loaded is not None and not _has_kernel("info_nce_forward", "CUDA"):
            return "the loaded extension was built without CUDA kernels (no CUDA toolkit/nvcc at build time)"
        if _loaded is None and not auto and find_cuda_home() is None and _aot_origin() is None:
            return "no CUDA toolkit found to build the CUDA kernels (set CUDA_HOME or put nvcc on PATH)"
    if auto and not is_built():
        return "the C++ extension is not built yet (backend='cext' builds it on first use; or run `make ext`)"
    if _loaded is None and not is_built():
        return _build_problem()
    return None


def _ensure() -> None:
    if _loaded is None:
        load()


def _first_order_only(op: str) -> None:
    """The C++ backward ops have no autograd formula of their own: differentiating them again
    (backward with create_graph=True, which runs backward with grad mode on) would be silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            SECOND_ORDER_ERROR if op == "info_nce" else
            f"second-order gradients (create_graph=True) through {op} are not supported by the cext "
            "backend; use backend='torch'"
        )


# ------------------------------------------------------------------ torch.library registrations
def _register_python_side() -> None:
    """Fake kernels and autograd formulas for the C++-defined ops (once per process)."""
    global _registered
    if _registered:
        return
    lib = "gacd_fast::"

    @torch.library.register_fake(lib + "pgd_step_")
    def _(x_adv, grad, x_nat, alpha_t, alpha, eps_t, eps, clip_min, clip_max, norm):
        return None

    @torch.library.register_fake(lib + "normalize")
    def _(x):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "normalize_backward")
    def _(grad, x):
        return x.new_empty(x.shape)

    @torch.library.register_fake(lib + "cosine_similarity")
    def _(a, b):
        return a.new_empty(a.shape[0], dtype=acc_dtype(a.dtype))

    @torch.library.register_fake(lib + "cosine_similarity_backward")
    def _(grad, a, b):
        return a.new_empty(a.shape), b.new_empty(b.shape)

    @torch.library.register_fake(lib + "info_nce_forward")
    def _(query, positive, negatives, neg_index, temperature, normalize, compute_dq):
        acc = acc_dtype(query.dtype)
        B = query.shape[0]
        dq_shape = tuple(query.shape) if compute_dq else (0,)
        return query.new_empty(B, dtype=acc), query.new_empty(B, dtype=acc), query.new_empty(dq_shape, dtype=acc)

    @torch.library.register_fake(lib + "info_nce_backward")
    def _(grad, query, positive, negatives, neg_index, lse, dq_neg, temperature, normalize, need_q, need_p, need_n):
        dq = query.new_empty(query.shape) if need_q else query.new_empty(0)
        dp = positive.new_empty(positive.shape) if need_p else query.new_empty(0)
        dn = negatives.new_empty(negatives.shape) if need_n else query.new_empty(0)
        return dq, dp, dn

    def _norm_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    def _norm_backward(ctx, grad):
        _first_order_only("normalize")
        (x,) = ctx.saved_tensors
        return torch.ops.gacd_fast.normalize_backward(grad, x)

    torch.library.register_autograd(lib + "normalize", _norm_backward, setup_context=_norm_setup)

    def _cos_setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], inputs[1])

    def _cos_backward(ctx, grad):
        _first_order_only("cosine_similarity")
        a, b = ctx.saved_tensors
        return torch.ops.gacd_fast.cosine_similarity_backward(grad, a, b)

    torch.library.register_autograd(lib + "cosine_similarity", _cos_backward, setup_context=_cos_setup)

    def _nce_setup(ctx, inputs, output):
        query, positive, negatives, neg_index, temperature, normalize, _compute_dq = inputs
        _, lse, dq_neg = output
        have_dq = dq_neg.numel() > 0
        # With d lse / d q from the forward the bank is not kept: an in-place bank update after
        # forward stays safe (the version counter is never checked on it).
        ctx.save_for_backward(query, positive, None if have_dq else negatives, neg_index, lse,
                              dq_neg if have_dq else None)
        ctx.temperature, ctx.normalize = temperature, normalize

    def _nce_backward(ctx, g_loss, _g_lse, _g_dq):
        # lse and dq_neg are auxiliary outputs: gradients reaching them are ignored.
        query, positive, negatives, neg_index, lse, dq_neg = ctx.saved_tensors
        need_q, need_p, need_n = ctx.needs_input_grad[:3]
        if g_loss is None:
            return None, None, None, None, None, None, None
        _first_order_only("info_nce")
        dq, dp, dn = torch.ops.gacd_fast.info_nce_backward(
            g_loss, query, positive, negatives, neg_index, lse, dq_neg, ctx.temperature, ctx.normalize,
            need_q, need_p, need_n,
        )
        return (dq if need_q else None, dp if need_p else None, dn if need_n else None, None, None, None, None)

    torch.library.register_autograd(lib + "info_nce_forward", _nce_backward, setup_context=_nce_setup)
    _registered = True


# ------------------------------------------------------------------------------ backend contract
def info_nce_rows(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    neg_index: torch.Tensor | None,
    temperature: float,
    normalize: bool,
) -> torch.Tensor:
    """Unweighted per-row loss [B] (float32; float64 for float64 inputs), as the reference defines it.

    query, positive [B, D]; negatives [K, D]; neg_index [B, M] int32/int64 or None (shared bank).
    """
    _ensure()
    # When the bank needs no gradient, d lse / d q comes out of the forward and the bank is not saved
    # for backward (an in-place memory-bank update after forward stays safe). On CPU it shares the
    # forward's pass over the bank; on CUDA it is the row-owned backward kernel run with g = 1.
    compute_dq = torch.is_grad_enabled() and query.requires_grad and not negatives.requires_grad
    loss, _, _ = torch.ops.gacd_fast.info_nce_forward(
        query, positive, negatives, neg_index, float(temperature), bool(normalize), compute_dq
    )
    return loss


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] rows divided by max(||row||, 1e-12), in x.dtype."""
    _ensure()
    return torch.ops.gacd_fast.normalize(x)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] -> [B] cosine of the rows, float32 (float64 for float64 inputs)."""
    _ensure()
    return torch.ops.gacd_fast.cosine_similarity(a, b)


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
    """One PGD step in place on x_adv [B, ...] (see reference.pgd_step_); returns x_adv."""
    _ensure()
    a_t, a = (alpha, 0.0) if isinstance(alpha, torch.Tensor) else (None, float(alpha))
    e_t, e = (eps, 0.0) if isinstance(eps, torch.Tensor) else (None, float(eps))
    target = x_adv if x_adv.is_contiguous() else x_adv.contiguous()
    torch.ops.gacd_fast.pgd_step_(target, grad, x_nat, a_t, a, e_t, e, float(clip_min), float(clip_max), norm)
    if target is not x_adv:
        x_adv.copy_(target)
    return x_adv
