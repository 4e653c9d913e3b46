"""Building and loading the C++/CUDA extension of csrc/ (the ``cext`` backend's library).

Where the library comes from, first that applies: already loaded in this process; an ahead-of-time
build installed as ``gacd_fast._C`` (``GACD_FAST_BUILD_EXT=1 pip install --no-build-isolation .``);
a JIT build in torch's extension cache (``TORCH_EXTENSIONS_DIR`` or ~/.cache/torch_extensions),
loaded as it is when it exists, else compiled with ninja (``load(build=True)`` only: "auto" never
starts a compile). A JIT build is keyed by everything it depends on (:func:`build_key`: sources,
flags, compiler, torch and Python versions, CUDA toolkit), so a build for another toolchain lives in
another folder and is never loaded or rebuilt by mistake. The library registers only kernels
(``TORCH_LIBRARY_IMPL``); the ops' schemas, fakes and autograd formulas are defined in Python
(``cext_backend.py``). setup.py uses the flags and source lists here for the ahead-of-time build.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

__all__ = [
    "load", "is_loaded", "is_built", "build_problem", "aot_library", "has_kernel", "source_dir", "sources", "find_cuda_home",
    "builds_cuda", "build_key", "toolchain", "CXX_FLAGS", "LD_FLAGS", "CUDA_FLAGS", "NAMESPACE",
]

NAMESPACE = "gacd_fast"  # the ops' namespace: torch.ops.gacd_fast.*

_lock = threading.RLock()
_loaded: str | None = None  # how the library came: "aot", "jit" or "preloaded"
_error: str | None = None  # why a build or load failed (kept so later calls fail fast)

# -ffp-contract=off: no FMA contraction, pgd_step_ must match eager bitwise; -fno-trapping-math
# (results unchanged) lets the compiler vectorise the softmax loops; -fopenmp: at::parallel_for is
# inlined from ATen's headers as an OpenMP region, which runs serially when compiled without it.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp"]
LD_FLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3"]  # the C++ standard: torch picks the one its headers need


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


def builds_cuda() -> bool:
    """Build the .cu sources too: only against a CUDA build of torch with a CUDA toolkit."""
    return torch.version.cuda is not None and find_cuda_home() is not None


def _tool_identity(name: str | None) -> str:
    """Which program ``name`` (a command or a path) is: its real path, size and modification time
    (a compiler upgraded in place changes them), or "missing"."""
    path = shutil.which(name) if name else None
    if path is None:
        return f"{name}: missing"
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except OSError:
        return f"{name}: {real}"
    return f"{name}: {real} {st.st_size} {st.st_mtime_ns}"


def toolchain(with_cuda: bool) -> list[str]:
    """What a build depends on besides its sources and flags: the C++ compiler ($CXX, else c++),
    torch's version and C++ ABI, Python's version, and for CUDA builds the toolkit's nvcc and the
    target architectures ($TORCH_CUDA_ARCH_LIST)."""
    parts = [
        _tool_identity(os.environ.get("CXX") or "c++"),
        f"torch {torch.__version__} {getattr(torch.version, 'git_version', '')} cuda {torch.version.cuda} "
        f"cxx11abi {getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', '?')}",
        f"python {platform.python_implementation()} {sys.version_info[0]}.{sys.version_info[1]}",
    ]
    if with_cuda:
        home = find_cuda_home()
        parts += [_tool_identity(os.path.join(home, "bin", "nvcc") if home else "nvcc"),
                  f"arch {os.environ.get('TORCH_CUDA_ARCH_LIST', '')}"]
    return parts


@lru_cache(maxsize=None)
def build_key(with_cuda: bool) -> str:
    """Digest of everything a JIT build depends on: the sources (and headers), the flags and the
    :func:`toolchain`. A build with another key lives in another folder: it is never loaded (a
    library whose kernels do not match the schemas defined in Python would abort the process while
    it registers), and switching toolchains back and forth never rebuilds."""
    digest = hashlib.sha256(" ".join(CXX_FLAGS + LD_FLAGS + CUDA_FLAGS).encode())
    for part in toolchain(with_cuda):
        digest.update(b"\0" + part.encode())
    root = source_dir()
    for path in sorted(p for p in _build_inputs(with_cuda) if p.exists()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _jit_name(with_cuda: bool) -> str:
    """The JIT build's name: ``gacd_fast_cext[_cuda]_<build_key[:12]>``."""
    return f"gacd_fast_cext{'_cuda' if with_cuda else ''}_{build_key(with_cuda)[:12]}"


# Cached: "auto" asks is_built() on every op call until the library is loaded, and these look-ups
# (the extension cache folder, an installed gacd_fast._C and its age) do not change within a process.
@lru_cache(maxsize=None)
def _jit_library(with_cuda: bool) -> Path:
    from torch.utils import cpp_extension

    name = _jit_name(with_cuda)
    return Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"


@lru_cache(maxsize=None)
def aot_library() -> str | None:
    """The ahead-of-time build (gacd_fast._C) when installed and not older than its sources, else None."""
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
    """The kernels are registered already (the library was loaded by other means)."""
    return has_kernel("info_nce_forward", "CPU")


def is_loaded() -> bool:
    """True once the library's ops are registered in this process."""
    return _loaded is not None


def is_built() -> bool:
    """True when loading needs no compiling: loaded, installed ahead of time, or a fresh JIT build."""
    if _loaded is not None or _ops_present() or aot_library() is not None:
        return True
    try:
        return _jit_library(builds_cuda()).exists()
    except (OSError, ValueError, AttributeError):  # _get_build_directory is private to torch
        return False


def _fresh(lib: Path, with_cuda: bool) -> bool:
    """``lib`` exists and is newer than every source it is built from (when those are present)."""
    if not lib.exists():
        return False
    inputs = [p for p in _build_inputs(with_cuda) if p.exists()]
    return not inputs or lib.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def build_problem() -> str | None:
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


def load(*, verbose: bool = False, build: bool = True) -> str:
    """Load the extension; returns how it came ("preloaded", "aot", "jit"). A JIT build of this
    :func:`build_key` in the cache is loaded as it is (ninja never runs); without one, ``build=True``
    compiles it first (announced on stderr), ``build=False`` ("auto") raises RuntimeError.

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
        if not build and not is_built():
            raise RuntimeError("the C++ extension is not built yet (backend='cext' builds it on first use; "
                               "or run `make ext`)")
        try:
            if _ops_present():
                how = "preloaded"
            elif (origin := aot_library()) is not None:
                torch.ops.load_library(origin)
                how = "aot"
            elif _jit_library(builds_cuda()).exists():
                torch.ops.load_library(str(_jit_library(builds_cuda())))
                how = "jit"
            else:
                _jit_build(verbose)
                how = "jit"
        except Exception as exc:  # keep the reason: a failed build is not retried on every call
            _error = f"building/loading the gacd_fast C++ extension failed: {type(exc).__name__}: {exc}"
            raise RuntimeError(_error) from exc
        _loaded = how
        return _loaded


def _jit_build(verbose: bool) -> None:
    problem = build_problem()
    if problem is not None:
        raise RuntimeError(problem)
    with_cuda = builds_cuda()
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
        build_directory=str(Path(_jit_library(with_cuda)).parent),  # the folder is_built() looks in
        sources=sources(with_cuda),
        extra_cflags=CXX_FLAGS,
        extra_ldflags=LD_FLAGS,
        extra_cuda_cflags=CUDA_FLAGS if with_cuda else None,
        is_python_module=False,
        verbose=verbose,
    )


def has_kernel(op: str, key: str) -> bool:
    """Whether the loaded library registered ``op``'s kernel for dispatch key ``key`` ("CPU", "CUDA")."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key))
    except RuntimeError:  # the op is not defined at all
        return False


def error() -> str | None:
    """Why the last build or load failed (None: it did not)."""
    return _error
