"""Input validation shared by every public entry point.

Each check raises TypeError (wrong kind or dtype), ValueError (wrong shape, value or option) or
IndexError (index out of range) with a message that names the argument, what was expected and
what came. Checks that read tensor values (index range, eps >= 0 on a tensor) synchronise with the
device, so they are skipped while torch.compile traces a graph, and can be switched off with
:func:`set_value_checks` for hot loops on a GPU.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


_value_checks = os.environ.get("GACD_FAST_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor values (index ranges, weights >= 0, finite eps/alpha >= 0
    on tensors, images in [0, 1]) on or off. Each costs a device synchronisation on a GPU; shape,
    dtype and device checks always run. Default: on, unless the environment variable
    GACD_FAST_VALUE_CHECKS=0.

    Switching them off is an opt-out of safety, not only of cost: an out-of-range ``neg_index``
    then reads out of bounds on the triton backend (garbage values, or a fault) and trips a
    device-side assertion on CUDA; the torch backend and the C++ CPU kernels still refuse it
    (IndexError / RuntimeError). Negative weights and NaN/negative per-sample eps are used as given.
    """
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _value_checks = enabled


def value_checks_enabled() -> bool:
    """Off when switched off, and while torch.compile traces (they would break the graph)."""
    return _value_checks and not torch.compiler.is_compiling()


def reads_values(t: torch.Tensor) -> bool:
    """Whether a value-reading check should look at ``t``: value checks are on and ``t`` has
    data (meta tensors have none; empty tensors hold nothing to check)."""
    return value_checks_enabled() and t.device.type != "meta" and t.numel() > 0


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    x: object,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> torch.Tensor:
    """Check that ``x`` is a tensor of an allowed dtype and rank; return it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(x.shape)}")
    return x


def check_nonempty(name: str, x: torch.Tensor, dims: Sequence[int]) -> None:
    for d in dims:
        if x.shape[d] == 0:
            raise ValueError(f"{name} must have a non-empty dim {d}, got shape {tuple(x.shape)}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(x.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(x.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    for name, t in items:  # a list or array here would fail on .device with no name
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )


def check_same_dtype(**tensors: torch.Tensor) -> None:
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}; they must match"
            )


def check_real(name: str, value: object, *, positive: bool = False, nonneg: bool = False) -> float:
    """A finite real number (Python or numpy scalar; bools rejected), optionally > 0 or >= 0;
    returned as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's bool is no Real
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def check_option(name: str, value: object, options: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {list(options)}, got {value!r}")
    return value


def check_bool(name: str, value: object) -> bool:
    """A Python bool (not an int, not a numpy bool); returned as is."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_backend_name(backend: object) -> str | None:
    """A ``backend=`` argument: None (the current selection), "auto" or a registered backend name,
    checked when the loss or attack is built rather than at its first call."""
    if backend is None or backend == "auto":
        return backend  # type: ignore[return-value]
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    # imported here: the registry imports only torch, but this module stays a leaf at import time
    from . import backends

    backends.unavailable_reason(backend)  # ValueError naming the known backends when unknown
    return backend


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """A Python or numpy integer (bools rejected), optionally >= ``minimum``; returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index_range(name: str, index: torch.Tensor, size: int, what: str) -> None:
    """Every entry of ``index`` must lie in [0, size); reads values, so skipped under compile."""
    if not reads_values(index):
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= size:
        raise IndexError(
            f"{name} must hold indices in [0, {size}) ({what}), got values in [{lo}, {hi}]"
        )


def check_per_sample(
    name: str, value: object, batch: int, device: torch.device, *, nonneg: bool = False
) -> float | torch.Tensor:
    """A real number, or a floating tensor of shape [batch] on ``device`` (per-sample value) that
    does not require grad; finite (and >= 0 when ``nonneg``) like a scalar would have to be."""
    if not isinstance(value, torch.Tensor):
        return check_real(name, value, nonneg=nonneg)
    check_tensor(name, value, ndim=1)
    check_shape(name, value, (batch,), "one value per sample")
    check_no_grad(name, value)
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the images are on {device}")
    if reads_values(value):
        if not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{name} must be finite for every sample, got {bad} NaN/inf of {batch}")
        if nonneg and bool((value < 0).any()):
            raise ValueError(f"{name} must be >= 0 for every sample, got min {float(value.min())}")
    return value


def check_no_grad(name: str, t: torch.Tensor) -> None:
    """In-place, no-grad ops take no tensor that requires grad (autograd could not follow them)."""
    if t.requires_grad:
        raise ValueError(f"{name} must not require grad (a constant of a no-grad op); pass {name}.detach()")


def check_nonneg_values(name: str, t: torch.Tensor) -> None:
    """Every entry of ``t`` is >= 0 (NaN passes: it propagates); reads values."""
    if reads_values(t) and bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0, got min {float(t.min())}")


def check_temperature(value: object) -> float:
    """tau > 0 whose reciprocal, the logits' scale, is finite in float32."""
    tau = check_real("temperature", value, positive=True)
    if 1.0 / tau > torch.finfo(torch.float32).max:
        raise ValueError(f"temperature must be >= {1.0 / torch.finfo(torch.float32).max:.3g} "
                         f"(its reciprocal scales the logits in float32), got {value}")
    return tau
