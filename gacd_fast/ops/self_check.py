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

Each check raises :class:`SelfCheckMismatch` naming the op's variant, the output and the largest
difference; an exception of the backend itself passes through. The registry turns either into one
warning and the torch backend for that op (see ``backends.py``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import cosine_similarity as cosine_op
from . import info_nce as info_nce_op
from . import l2_normalize as normalize_op
from . import pgd_step as step_op

# (atol, rtol) per input dtype for values and gradients against the float64 reference: the conformance
# tests' table (tests/tolerances.py; tests/test_self_check.py checks that they agree).
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}
TEMPERATURE = 0.2  # moderate logits: the gradients stay O(10), where the tolerances mean what they say
SEED = 20_251_202  # the check's private generator


class SelfCheckMismatch(AssertionError):
    """A backend's result differs from the reference beyond the tolerance."""


Tolerance = tuple[float, float]


def _compare(what: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor], tol: Tolerance) -> None:
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


def _rand(gen: torch.Generator, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
          low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Uniform values drawn on the CPU from ``gen`` (so every device sees the same inputs), rounded
    to ``dtype`` and moved to ``device``."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype).to(device)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], upstream: torch.Tensor) -> list[Optional[torch.Tensor]]:
    wanted = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, upstream.to(out.dtype), allow_unused=True))
    return [next(got) if t.requires_grad else None for t in inputs]


def _leaves(tensors: list[torch.Tensor], need: tuple[bool, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the inputs as leaves requiring grad where ``need``, their float64 twins alike)."""
    ours = [t.detach().clone().requires_grad_(r) for t, r in zip(tensors, need)]
    refs = [t.detach().to(torch.float64).requires_grad_(r) for t, r in zip(tensors, need)]
    return ours, refs


def _check_info_nce(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    gen = torch.Generator().manual_seed(SEED)
    B, K, D, M = 4, 9, 12, 5
    q, p, n = (_rand(gen, shape, device, dtype) for shape in ((B, D), (B, D), (K, D)))
    idx = torch.randint(K, (B, M), generator=gen).to(device)
    upstream = _rand(gen, (B,), device, torch.float32, 0.5, 1.5)
    # the variants the pipeline runs: a bank with and without gradient (memory/queue rows are
    # constants), and a gathered bank (neg_index) with and without (memory bank; in-batch negatives)
    for neg_index, bank_grad in ((None, True), (None, False), (idx, False), (idx, True)):
        variant = f"info_nce_rows ({'neg_index' if neg_index is not None else 'shared bank'}, " \
                  f"negatives {'with' if bank_grad else 'without'} grad)"
        need = (True, True, bank_grad)
        ours, refs = _leaves([q, p, n], need)
        got = fn(*ours, neg_index, TEMPERATURE, True)
        want = info_nce_op.reference(*refs, neg_index, TEMPERATURE, True)
        _compare(f"{variant}: loss", got, want, tol)
        for name, g, w in zip(("d query", "d positive", "d negatives"),
                              _grads(got, ours, upstream), _grads(want, refs, upstream)):
            _compare(f"{variant}: {name}", g, w, tol)


def _check_l2_normalize(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    gen = torch.Generator().manual_seed(SEED)
    x = _rand(gen, (5, 13), device, dtype)
    upstream = _rand(gen, (5, 13), device, torch.float32)
    (ours,), (ref,) = _leaves([x], (True,))
    got, want = fn(ours), normalize_op.reference(ref)
    _compare("l2_normalize: value", got, want, tol)
    _compare("l2_normalize: d x", _grads(got, [ours], upstream)[0], _grads(want, [ref], upstream)[0], tol)


def _check_cosine_similarity(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    gen = torch.Generator().manual_seed(SEED)
    a, b = _rand(gen, (5, 13), device, dtype), _rand(gen, (5, 13), device, dtype)
    upstream = _rand(gen, (5,), device, torch.float32)
    ours, refs = _leaves([a, b], (True, True))
    got, want = fn(*ours), cosine_op.reference(*refs)
    _compare("cosine_similarity: value", got, want, tol)
    for name, g, w in zip(("d a", "d b"), _grads(got, ours, upstream), _grads(want, refs, upstream)):
        _compare(f"cosine_similarity: {name}", g, w, tol)


def _check_pgd_step(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    gen = torch.Generator().manual_seed(SEED)
    shape = (3, 2, 5)
    x_nat = _rand(gen, shape, device, dtype, 0.0, 1.0)
    x_adv = (x_nat + _rand(gen, shape, device, dtype, -0.05, 0.05)).clamp(0, 1)
    grad = _rand(gen, shape, device, dtype)
    eps_t = _rand(gen, (shape[0],), device, dtype, 0.02, 0.1)
    for norm, alpha, eps in (("linf", 0.03, 0.06), ("l2", 0.1, eps_t)):
        got = fn(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, norm)
        want = step_op.reference(x_adv.to(torch.float64), grad.to(torch.float64), x_nat.to(torch.float64), alpha,
                                 eps.to(torch.float64) if isinstance(eps, torch.Tensor) else eps, 0.0, 1.0, norm)
        _compare(f"pgd_step_ ({norm}): x_adv", got, want, tol)


def _check_pgd_random_start(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    """Random draws differ between backends by design: the start must lie in the eps-ball and [0, 1]."""
    gen = torch.Generator().manual_seed(SEED)
    x_nat = _rand(gen, (3, 2, 5), device, dtype, 0.0, 1.0)
    eps = 0.1
    draw = torch.Generator(device=device).manual_seed(SEED)
    got = fn(x_nat, eps, "linf", draw)
    if tuple(got.shape) != tuple(x_nat.shape) or got.dtype != x_nat.dtype or got.device != x_nat.device:
        raise SelfCheckMismatch(f"pgd_random_start: got {tuple(got.shape)} {got.dtype} on {got.device}, expected "
                                f"{tuple(x_nat.shape)} {x_nat.dtype} on {x_nat.device}")
    g, x = got.detach().to("cpu", torch.float64), x_nat.to("cpu", torch.float64)
    atol = tol[0] + tol[1]
    if not (bool(torch.isfinite(g).all()) and bool(((g - x).abs() <= eps + atol).all())
            and bool((g >= -atol).all()) and bool((g <= 1 + atol).all())):
        raise SelfCheckMismatch("pgd_random_start (linf): a start outside the eps-ball or [0, 1]")


CHECKS: dict[str, Callable[[Callable, torch.device, torch.dtype, Tolerance], None]] = {
    "info_nce_rows": _check_info_nce,
    "l2_normalize": _check_l2_normalize,
    "cosine_similarity": _check_cosine_similarity,
    "pgd_step_": _check_pgd_step,
    "pgd_random_start": _check_pgd_random_start,
}


def check(op: str, fn: Callable, device: torch.device, dtype: torch.dtype | None,
          tolerance: Tolerance | None = None) -> None:
    """Run ``fn`` (a backend's entry for ``op``) on small inputs of ``dtype`` (None: float32) on
    ``device`` against the reference; raises SelfCheckMismatch, or what the backend raised. An op
    without a check (``nce_rows``: the torch backend alone runs it) passes. ``tolerance``: (atol,
    rtol) instead of the dtype's (a backend's own precision mode, e.g. TF32 dots)."""
    run = CHECKS.get(op)
    if run is None:
        return
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in TOLERANCES:
        return  # not a dtype the ops take: the op's own checks refuse it
    tol = tolerance or TOLERANCES[dtype]
    with torch.inference_mode(False), torch.enable_grad(), _no_autocast(device):
        run(fn, device, dtype, tol)


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type without autocast
        import contextlib

        return contextlib.nullcontext()
