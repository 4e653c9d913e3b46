"""Backend registry: which implementation of the ops runs for a given call.

A backend is a module that defines the ops (``info_nce_rows``, ``nce_rows``, ``l2_normalize``,
``cosine_similarity``, ``pgd_step_``, ``pgd_random_start``; a backend may leave some out) and
``unavailable_reason(device, auto) -> str | None``. Modules are imported on first use, so a missing
dependency (no triton, an unbuilt extension) only makes that backend unavailable.

Choice, first that applies: ``backend=`` per call, :func:`set_backend`, the environment variable
``GACD_FAST_BACKEND``, else ``"auto"``: the first backend in :data:`AUTO_ORDER` that is available
for the tensors' device and has the op. An explicitly named backend that cannot run is an error
naming what is missing; "auto" falls back quietly.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

ENV_VAR = "GACD_FAST_BACKEND"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    description: str


_SPECS: dict[str, BackendSpec] = {}
# Preference of "auto", fastest first.
AUTO_ORDER: list[str] = []
_modules: dict[str, ModuleType | Exception] = {}
_selected: str | None = None


def register_backend(spec: BackendSpec, *, priority: int | None = None) -> None:
    """Add a backend; ``priority`` is its place in the "auto" order (default: last)."""
    _SPECS[spec.name] = spec
    if spec.name in AUTO_ORDER:
        AUTO_ORDER.remove(spec.name)
    AUTO_ORDER.insert(len(AUTO_ORDER) if priority is None else priority, spec.name)
    _modules.pop(spec.name, None)


register_backend(BackendSpec("triton", "gacd_fast.ops.triton_backend", "fused Triton kernels"))
register_backend(BackendSpec("cext", "gacd_fast.ops.cext_backend", "C++/CUDA extension (csrc/)"))
register_backend(BackendSpec("torch", "gacd_fast.ops.torch_backend", "pure-PyTorch reference"))


def _load(name: str) -> ModuleType | Exception:
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(_SPECS[name].module)
        except Exception as exc:  # any import failure makes the backend unavailable, with a reason
            _modules[name] = exc
    return _modules[name]


def unavailable_reason(name: str, device: torch.device | None = None, *, auto: bool = False) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None: it can). ``device=None``: anywhere."""
    if name not in _SPECS:
        raise ValueError(f"unknown backend {name!r}; known backends: {sorted(_SPECS)}")
    mod = _load(name)
    if isinstance(mod, Exception):
        return f"importing {_SPECS[name].module} failed: {type(mod).__name__}: {mod}"
    return mod.unavailable_reason(device, auto=auto)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends that can run (on ``device`` if given), in "auto" preference order."""
    dev = torch.device(device) if device is not None else None
    return [n for n in AUTO_ORDER if unavailable_reason(n, dev) is None]


def _check_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name != "auto" and name not in _SPECS:
        raise ValueError(
            f"unknown backend {name!r}; known: {sorted(_SPECS)} or 'auto'; "
            f"available here: {available_backends()}"
        )
    return name


def set_backend(name: str | None) -> None:
    """Select the backend for every later call ("auto", a backend name, or None to clear).

    An explicit name is checked now: selecting a backend that cannot run raises RuntimeError.
    A graph already compiled by torch.compile keeps the backend chosen when it was traced.
    """
    global _selected
    if name is None:
        _selected = None
        return
    _check_name(name)
    if name != "auto":
        reason = unavailable_reason(name)
        if reason is not None:
            raise RuntimeError(
                f"backend {name!r} is not available: {reason}; available: {available_backends()}"
            )
    _selected = name


def get_backend() -> str:
    """The current selection: set_backend's, else $GACD_FAST_BACKEND, else "auto"."""
    if _selected is not None:
        return _selected
    return _check_name(os.environ.get(ENV_VAR, "auto") or "auto")


# torch.compile evaluates the choice once, while tracing, and keeps the name as a constant: the lazy
# imports and availability probes cannot be traced, a dict and attribute lookup can.
@torch.compiler.assume_constant_result
def _choose(op: str, device: torch.device, backend: str | None) -> str:
    name = _check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        for cand in AUTO_ORDER:
            if unavailable_reason(cand, device, auto=True) is None and hasattr(_load(cand), op):
                return cand
        raise RuntimeError(f"no backend can run {op} on {device}")  # torch always can
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(
            f"backend {name!r} cannot run on {device}: {reason}; "
            f"available for {device}: {available_backends(device)}"
        )
    if not hasattr(_load(name), op):
        having = [n for n in available_backends(device) if hasattr(_load(n), op)]
        raise NotImplementedError(f"backend {name!r} does not implement {op}; backends that do: {having}")
    return name


def resolve(op: str, device: torch.device, backend: str | None = None) -> tuple[str, Callable]:
    """The (backend name, function) that runs ``op`` for tensors on ``device``."""
    name = _choose(op, device, backend)
    return name, getattr(_modules[name], op)
