"""Row L2-normalisation: its definition and the contract of its compiled backends."""
from __future__ import annotations

import torch

from .contract import CompiledOp, check_like, check_rows, first_order_only
from .norms import unit_rows

SECOND_ORDER_ERROR = (
    "second-order gradients (create_graph=True) through l2_normalize are supported only by the torch backend"
)


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
OPS = (FORWARD, BACKWARD)


def compiled(namespace: str, x: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [N, D] normalised rows from ``namespace``'s compiled ops."""
    return FORWARD.resolve(namespace)(x)
