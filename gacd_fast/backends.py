"""Backend registry: which implementation of the ops runs for a given call.

A backend is a module that defines the ops (``info_nce_rows``, ``nce_rows``, ``l2_normalize``,
``cosine_similarity``, ``pgd_step_``, ``pgd_random_start``; a backend may leave some out) and
``unavailable_reason(device, auto) -> str | None``; the built-in ones build those functions from
the ops' contracts (``gacd_fast/ops/entries.py``). Modules are imported on first use, so a missing
dependency (no triton, an unbuilt extension) only makes that backend unavailable.

Choice, first that applies: ``backend=`` per call, :func:`set_backend`, the environment variable
``GACD_FAST_BACKEND``, else ``"auto"``: the first backend in :data:`AUTO_ORDER` that is available
for the tensors' device and has the op. An explicitly named backend that cannot run is an error
naming what is missing; "auto" falls back quietly.

First contact: before "auto" first uses a backend other than the torch reference for an op on a
(device, dtype), it checks that backend's op once per process against the reference on small
inputs, values and gradients (:mod:`gacd_fast.ops.self_check`). On a mismatch or an exception the
op falls back to the torch backend there, with one warning naming the op, the backend, the device
and the error. ``GACD_FAST_SELF_CHECK=0`` (or :func:`set_self_check`) skips the check; a backend
named explicitly (``backend=``, :func:`set_backend`, ``GACD_FAST_BACKEND``) is used as asked,
unchecked. A backend module may define ``prepare(auto)``, called before its op is handed out
(the cext backend loads its library there): it runs outside any torch.compile trace, like the check.
"""
from __future__ import annotations

import importlib
import os
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

ENV_VAR = "GACD_FAST_BACKEND"
SELF_CHECK_ENV = "GACD_FAST_SELF_CHECK"
REFERENCE = "torch"  # the backend every other one is checked against, and falls back to


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
def self_check_from_env() -> bool:
    """The first-use check is on unless $GACD_FAST_SELF_CHECK is "0" (read once, at import)."""
    return os.environ.get(SELF_CHECK_ENV, "1") != "0"


_self_check = self_check_from_env()
# (op, backend, device, dtype) -> whether "auto" may use that backend there (its first-use check passed)
_verdicts: dict[tuple, bool] = {}
# the same verdicts keyed by the call's own torch.device object: the per-call look-up hashes it instead
# of building a device string (torch.device.type alone costs about a microsecond)
_seen: dict[tuple, bool] = {}
_verdict_lock = threading.Lock()


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


def set_self_check(enabled: bool) -> None:
    """Run (True, the default unless $GACD_FAST_SELF_CHECK=0) or skip the first-use check of a
    compiled backend's op before "auto" uses it. Verdicts already reached in this process stay."""
    global _self_check
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _self_check = enabled


def self_check_verdicts() -> dict[tuple, bool]:
    """A copy of this process's verdicts: (op, backend, device, dtype) -> passed."""
    return dict(_verdicts)


def _device_key(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _prepare(name: str, *, auto: bool) -> None:
    prepare = getattr(_load(name), "prepare", None)
    if prepare is not None:
        prepare(auto)


def _usable_by_auto(name: str, op: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    """Whether "auto" may hand out backend ``name``'s ``op`` for (device, dtype): the reference
    always; another backend once it is prepared and, with the self-check on, its check passed (once
    per process; a failure warns once and is remembered)."""
    if name == REFERENCE:
        return True
    seen = (op, name, device, dtype)
    verdict = _seen.get(seen)
    if verdict is not None:
        return verdict
    key = (op, name, _device_key(device), dtype)
    with _verdict_lock:
        if key not in _verdicts:
            _verdicts[key] = _first_use(name, op, device, dtype)
        _seen[seen] = _verdicts[key]
        return _seen[seen]


def _first_use(name: str, op: str, device: torch.device, dtype: torch.dtype | None) -> bool:
    from .ops import self_check

    what = "could not be prepared"
    try:
        _prepare(name, auto=True)
        if _self_check:
            what = "failed its first-use self-check"
            module = _load(name)
            tolerance = getattr(module, "self_check_tolerance", lambda dt: None)(dtype or torch.float32)
            self_check.check(op, getattr(module, op), device, dtype, tolerance)
    except Exception as exc:  # a mismatch, or anything the backend raised: fall back, say so once
        dt = str(dtype or torch.float32).replace("torch.", "")
        warnings.warn(
            f"gacd_fast: backend {name!r} {what} for {op} on {device} ({dt}): {type(exc).__name__}: {exc}; "
            f"'auto' uses the {REFERENCE} backend for {op} there ({SELF_CHECK_ENV}=0 skips the check, "
            f"backend={name!r} uses it unchecked)",
            RuntimeWarning, stacklevel=2,
        )
        return False
    return True


# torch.compile evaluates the choice once, while tracing, and keeps the name as a constant: the lazy
# imports, availability probes, the library load and the first-use check cannot be traced (they run
# here, eagerly, at trace time), a dict and attribute lookup can.
@torch.compiler.assume_constant_result
def _choose(op: str, device: torch.device, backend: str | None, dtype: torch.dtype | None = None) -> str:
    name = _check_name(backend) if backend is not None else get_backend()
    if name == "auto":
        for cand in AUTO_ORDER:
            if unavailable_reason(cand, device, auto=True) is None and hasattr(_load(cand), op):
                # the first backend "auto" would use; if it failed its first-use check: the reference
                if _usable_by_auto(cand, op, device, dtype):
                    return cand
                _load(REFERENCE)
                return REFERENCE
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
    _prepare(name, auto=False)  # e.g. build the extension now, outside any trace
    return name


def resolve(op: str, device: torch.device, backend: str | None = None,
            dtype: torch.dtype | None = None) -> tuple[str, Callable]:
    """The (backend name, function) that runs ``op`` for tensors of ``dtype`` on ``device`` (the
    dtype keys "auto"'s first-use check; None: checked as float32)."""
    name = _choose(op, device, backend, dtype)
    return name, getattr(_modules[name], op)
