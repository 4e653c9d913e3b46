"""Row-wise cosine similarity: its definition and the contract of its compiled backends."""
from __future__ import annotations

from typing import Callable

import torch

from .._numerics import acc_dtype
from .contract import CompiledOp, Op, check_like, check_rows, first_order_only, second_order_error
from .norms import unit_rows
from .self_check import SEED, Tolerance, compare, grads, leaves, rand

SECOND_ORDER_ERROR = second_order_error("cosine_similarity")


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, D], [B, D] -> [B] in the accumulation dtype: normalize(a)_i . normalize(b)_i."""
    return (unit_rows(a) * unit_rows(b)).sum(-1)


def _fake(a, b):
    check_rows("a", a)
    check_like("b", b, "a", a)
    return a.new_empty(a.shape[0], dtype=acc_dtype(a.dtype))


def _fake_backward(grad, a, b):
    check_rows("a", a)
    check_like("b", b, "a", a)
    torch._check(grad.shape == (a.shape[0],), lambda: f"grad must be [B={a.shape[0]}], got {tuple(grad.shape)}")
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], inputs[1])


def _backward(namespace: str, ctx, grad):
    first_order_only(SECOND_ORDER_ERROR)
    a, b = ctx.saved_tensors
    da, db = BACKWARD.resolve(namespace)(grad, a, b)
    return (da if ctx.needs_input_grad[0] else None), (db if ctx.needs_input_grad[1] else None)


FORWARD = CompiledOp("cosine_similarity", "(Tensor a, Tensor b) -> Tensor", _fake, _backward, _setup_context)
# (d a, d b) in the inputs' dtypes, from ``grad`` [B] (the output's dtype).
BACKWARD = CompiledOp("cosine_similarity_backward", "(Tensor grad, Tensor a, Tensor b) -> (Tensor, Tensor)",
                      _fake_backward)


def _self_check(fn: Callable, device: torch.device, dtype: torch.dtype, tol: Tolerance) -> None:
    """The first-use check: value and both gradients on a small batch of rows."""
    gen = torch.Generator().manual_seed(SEED)
    a, b = rand(gen, (5, 13), device, dtype), rand(gen, (5, 13), device, dtype)
    upstream = rand(gen, (5,), device, torch.float32)
    ours, refs = leaves([a, b], (True, True))
    got, want = fn(*ours), reference(*refs)
    compare("cosine_similarity: value", got, want, tol)
    for name, g, w in zip(("d a", "d b"), grads(got, ours, upstream), grads(want, refs, upstream)):
        compare(f"cosine_similarity: {name}", g, w, tol)


OP = Op("cosine_similarity", "cosine_similarity", reference, compiled=(FORWARD, BACKWARD), self_check=_self_check)
