"""Row L2-normalisation: its definition and the contract of its compiled backends."""
from __future__ import annotations

from typing import Callable

import torch

from .contract import CompiledOp, Op, check_like, check_rows, first_order_only, second_order_error
from .norms import unit_rows
from .self_check import SEED, Tolerance, compare, grads, leaves, rand

SECOND_ORDER_ERROR = second_order_error("l2_normalize")


def reference(x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] rows / max(||row||_2, NORM_EPS), computed in float32/64 (overflow-safe),
    returned in ``x.dtype``."""
    return unit_rows(x).to(x.dtype)


def _fake(x):
    check_rows("x", x)
    return x.new_empty(x.shape)


def _fake_backward(grad, x):
    check_rows("x", x)
    check_like("grad", grad, "x", x)
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _backward(namespace: str, ctx, grad):
    first_order_only(SECOND_ORDER_ERROR)
    (x,) = ctx.saved_tensors
    return BACKWARD.resolve(namespace)(grad, x)


FORWARD = CompiledOp("l2_normalize", "(Tensor x) -> Tensor", _fake, _backward, _setup_context)
# d x [N, D] in x's dtype, from the output's gradient ``grad`` [N, D] (x's dtype).
BACKWARD = CompiledOp("l2_normalize_backward", "(Tensor grad, Tensor x) -> Tensor", _fake_backward)


def _self_check(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    """The first-use check: value and gradient on a small batch of rows."""
    gen = torch.Generator().manual_seed(SEED)
    x = rand(gen, (5, 13), device, dtype)
    upstream = rand(gen, (5, 13), device, torch.float32)
    (ours,), (ref,) = leaves([x], (True,))
    got, want = fn(ours), reference(ref)
    compare("l2_normalize: value", got, want, tol)
    compare("l2_normalize: d x", grads(got, [ours], upstream)[0], grads(want, [ref], upstream)[0], tol)


OP = Op("l2_normalize", "l2_normalize", reference, compiled=(FORWARD, BACKWARD), self_check=_self_check)
