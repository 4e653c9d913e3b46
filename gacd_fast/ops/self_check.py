"""First contact with a device: check a compiled backend's op against the reference before "auto"
first uses it on a (device, dtype).

No fused kernel of this project had run on a GPU before a user's did; a kernel that compiles but
misbehaves on hardware nobody tested must not give silently wrong numbers. So the registry
(:mod:`gacd_fast.backends`) calls :func:`check` once per process for each (op, backend, device,
dtype) that "auto" is about to use: the backend's own entry for the op runs on small random inputs
(a private generator: the global RNG streams are untouched) and its values and gradients must match
the op's reference, computed in float64 from the same inputs, within the conformance tolerances of
the tests (:data:`TOLERANCES`, the table of ``tests/tolerances.py``). The check runs with grad mode
on, outside inference mode and autocast, whatever the caller's modes. It takes a few milliseconds
on a CPU (a first GPU call pays the kernels' compile, which the op's first real call would pay anyway).

Each op's check lives in its module (``Op.self_check``, written with the helpers here: :func:`rand`,
:func:`leaves`, :func:`grads`, :func:`compare`). It raises :class:`SelfCheckMismatch` naming the
op's variant, the output and the largest difference; an exception of the backend itself passes
through. The registry turns either into one warning and the torch backend for that op (see
``backends.py``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._precision import no_autocast

# (atol, rtol) per input dtype for values and gradients against the float64 reference: the conformance
# tests' table (tests/tolerances.py; tests/test_self_check.py checks that they agree).
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
SEED = 20_251_202  # the checks' private generator


class SelfCheckMismatch(AssertionError):
    """A backend's result differs from the reference beyond the tolerance."""


Tolerance = tuple[float, float]


def compare(what: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor], tol: Tolerance) -> None:
    if got is None or want is None:
        if (got is None) != (want is None):
            raise SelfCheckMismatch(f"{what}: {'no result' if got is None else 'a result where none was expected'}")
        return
    if tuple(got.shape) != tuple(want.shape):
        raise SelfCheckMismatch(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    a = got.detach().to("cpu", torch.float64)
    e = want.detach().to("cpu", torch.float64)
    atol, rtol = tol
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bool(bad.any()):
        diff = (a - e).abs()[bad].max().item()
        raise SelfCheckMismatch(f"{what}: {int(bad.sum())}/{a.numel()} values differ from the reference "
                                f"(max abs diff {diff:.3g}, tolerance atol {atol:g} rtol {rtol:g})")


def rand(gen: torch.Generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
          low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Uniform values drawn on the CPU from ``gen`` (so every device sees the same inputs), rounded
    to ``dtype`` and moved to ``device``."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype).to(device)


def grads(out: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list[Optional[torch.Tensor]]:
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, upstream.to(out.dtype), allow_unused=True))
    return [next(got) if t.requires_grad else None for t in inputs]


def leaves(tensors: list[torch.Tensor], need: tuple[bool, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the inputs as leaves requiring grad where ``need``, their float64 twins alike)."""
    ours = [t.detach().clone().requires_grad_(r) for t, r in zip(tensors, need)]
    refs = [t.detach().to(torch.float64).requires_grad_(r) for t, r in zip(tensors, need)]
    return ours, refs


def check(op: str, fn: Callable, device: torch.device, dtype: torch.dtype | None,
          tolerance: Tolerance | None = None) -> None:
    """Run ``fn`` (a backend's entry for ``op``) on small inputs of ``dtype`` (None: float32) on
    ``device`` against the reference; raises SelfCheckMismatch, or what the backend raised. An op
    without a check (``nce_rows``: the torch backend alone runs it) passes. ``tolerance``: (atol,
    rtol) instead of the dtype's (a backend's own precision mode, e.g. TF32 dots)."""
    from .reference import OPS  # here, not at import: the op modules import this module's helpers

    run = next((o.self_check for o in OPS if o.entry == op), None)
    if run is None:
        return
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in TOLERANCES:
        return  # not a dtype the ops take: the op's own checks refuse it
    tol = tolerance or TOLERANCES[dtype]
    with torch.inference_mode(False), torch.enable_grad(), no_autocast(device):
        run(fn, device, dtype, tol)

