"""Mixed precision, shared by the attacks and the pipeline: the precision names, their autocast
dtypes, and whether a device can run them (a leaf helper: it imports nothing from the package).

"fp32" adds no autocast region of its own (an enclosing one still applies, as to any code);
"bf16" and "fp16" run the region under ``torch.autocast`` with that dtype. A precision the device
cannot run is a RuntimeError that says why; one it runs only emulated (a CPU without bf16/fp16
instructions; measured 1.2-24x slower than fp32
on the AVX2 machines of this project) warns once per process, because the user asked for speed.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import ContextManager

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

INSTRUCTIONS = {"bf16": "AVX512-BF16 or AMX-BF16", "fp16": "AVX512-FP16 or AMX-FP16"}  # what a CPU needs

# a CPU's half-precision products: "1" always (tests), "0" never, else where the CPU has the instructions
PRODUCTS_ENV = "GACD_FAST_LOWP_PRODUCTS"
CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}  # torch's cpuinfo keys
HALF_PRECISIONS = {torch.bfloat16: "bf16", torch.float16: "fp16"}

_verdicts: dict[tuple[str, str], str | None] = {}  # (precision, device type) -> the reason it cannot run
_warned: set[tuple[str, str]] = set()


def check_precision(name: str, value: object) -> str:
    """``value`` if it is one of PRECISIONS, else ValueError naming ``name``."""
    if not isinstance(value, str) or value not in PRECISIONS:
        raise ValueError(f"{name} must be one of {list(PRECISIONS)}, got {value!r}")
    return value


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` (None for "fp32": no autocast)."""
    return AUTOCAST_DTYPES.get(precision)


def unsupported_reason(precision: str, device: torch.device) -> str | None:
    """Why ``device`` cannot run ``precision`` (None: it can). Cached per device type."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return None
    key = (precision, device.type)
    if key not in _verdicts:
        _verdicts[key] = _probe(precision, dtype, device)
    return _verdicts[key]


def _probe(precision: str, dtype: torch.dtype, device: torch.device) -> str | None:
    if not torch.amp.is_autocast_available(device.type):
        return f"torch has no autocast for {device.type} tensors"
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        major, minor = torch.cuda.get_device_capability(device)
        return f"bf16 needs a GPU of compute capability 8.0 or newer (this one is {major}.{minor}); use 'fp16'"
    with warnings.catch_warnings():  # an unsupported dtype is a warning and a disabled region in torch
        warnings.simplefilter("ignore")
        with torch.autocast(device.type, dtype=dtype):
            enabled = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == dtype
    if not enabled:
        return f"this torch's {device.type} autocast does not support {dtype}"
    return None


@functools.lru_cache(maxsize=None)
def _cpu_has(precision: str) -> bool:
    caps = torch._C._cpu._get_cpu_capability()
    return any(bool(caps.get(flag)) for flag in CPU_FLAGS[precision])


def is_native(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``precision`` in hardware: every GPU that can run it at all; a
    CPU with the instructions (AVX512-BF16/AMX-BF16 for bf16, AVX512-FP16/AMX-FP16 for fp16), as
    torch's cpuinfo reports them."""
    return precision == "fp32" or device.type != "cpu" or _cpu_has(precision)


def fast_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the ops should multiply ``dtype`` (bfloat16/float16) tensors in that dtype (with
    float32 sums) rather than upcast them first: on a GPU, and on a CPU that has the instructions
    (:func:`is_native`); ``GACD_FAST_LOWP_PRODUCTS=1``/``0`` forces the choice on a CPU."""
    precision = HALF_PRECISIONS.get(dtype)
    if precision is None or device.type not in ("cpu", "cuda"):
        return False
    if device.type == "cuda":
        return True
    forced = os.environ.get(PRODUCTS_ENV, "")
    return forced == "1" if forced in ("0", "1") else is_native(precision, device)


def check_device(precision: str, device: torch.device, what: str, stacklevel: int = 2) -> None:
    """RuntimeError when ``device`` cannot run ``precision`` (``what``: who asked, for the message);
    one warning per process when it runs it only emulated (``stacklevel`` as warnings.warn's, from
    the caller of this function)."""
    reason = unsupported_reason(precision, device)
    if reason is not None:
        raise RuntimeError(f"{what}: precision={precision!r} cannot run on {device}: {reason}")
    key = (precision, device.type)
    if key not in _warned and not is_native(precision, device):
        _warned.add(key)
        warnings.warn(
            f"{what}: precision={precision!r} runs emulated on this CPU (torch's CPU capability is "
            f"{torch.backends.cpu.get_cpu_capability()}, without {INSTRUCTIONS[precision]}): expect it to be slower "
            "than 'fp32' here", RuntimeWarning, stacklevel=stacklevel + 1)


def enclosing_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype of the autocast region enclosing this code for ``device``'s type (None: none, or
    no autocast for that device type, e.g. meta tensors)."""
    kind = device.type
    if not torch.amp.is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def no_autocast(device: torch.device) -> ContextManager[None]:
    """A region where ``device``'s autocast is off (a no-op for a device type without autocast)."""
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def autocast(precision: str, device: torch.device) -> ContextManager[None]:
    """The autocast region of ``precision`` for ``device`` (a no-op context for "fp32")."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
