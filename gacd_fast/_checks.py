"""Input validation shared by every public entry point.

Each check raises TypeError (wrong kind or dtype), ValueError (wrong shape, value or option) or
IndexError (index out of range) with a message that names the argument, what was expected and
what came. Checks that read tensor values (index range, eps >= 0 on a tensor) synchronise with the
device, so they are skipped while torch.compile traces a graph, and can be switched off with
:func:`set_value_checks` for hot loops on a GPU.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


_value_checks = os.environ.get("GACD_FAST_VALUE_CHECKS", "1") != "0"


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor values (index ranges, eps >= 0 on tensors, images in
    [0, 1]) on or off. Each costs a device synchronisation on a GPU; shape, dtype and device checks
    always run. Default: on, unless the environment variable GACD_FAST_VALUE_CHECKS=0."""
    global _value_checks
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _value_checks = enabled


def value_checks_enabled() -> bool:
    """Off when switched off, and while torch.compile traces (they would break the graph)."""
    return _value_checks and not torch.compiler.is_compiling()


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
    """A finite Python real number (bools rejected), optionally > 0 or >= 0; returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
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


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_index_range(name: str, index: torch.Tensor, size: int, what: str) -> None:
    """Every entry of ``index`` must lie in [0, size); reads values, so skipped under compile."""
    if not value_checks_enabled() or index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= size:
        raise IndexError(
            f"{name} must hold indices in [0, {size}) ({what}), got values in [{lo}, {hi}]"
        )


def check_per_sample(
    name: str, value: object, batch: int, device: torch.device, *, nonneg: bool = False
) -> float | torch.Tensor:
    """A Python real, or a floating tensor of shape [batch] on ``device`` (per-sample value)."""
    if not isinstance(value, torch.Tensor):
        return check_real(name, value, nonneg=nonneg)
    check_tensor(name, value, ndim=1)
    check_shape(name, value, (batch,), "one value per sample")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the images are on {device}")
    if nonneg and value_checks_enabled():
        bad = value < 0
        if bool(bad.any()):
            raise ValueError(f"{name} must be >= 0 for every sample, got min {float(value.min())}")
    return value
