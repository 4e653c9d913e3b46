"""Triton normalize / cosine_similarity (values and gradients) against the reference."""
from __future__ import annotations

import os

import pytest
import torch

import gacd_fast
from gacd_fast.ops import reference as R
from gacd_fast.ops import triton_backend as TB
from tolerances import assert_close

DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.parametrize("device", DEVICES)

SHAPES = [(1, 1), (5, 31), (64, 200), (3, 1030)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rows(shape, dtype, device):
    x = torch.randn(shape, device=device)
    if shape[1] > 1:  # a short row (for D = 1 the exact gradient is 0: pure cancellation error)
        x[0] *= 0.05
    return x.to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize(device, shape, dtype):
    x = _rows(shape, dtype, device)
    dy = torch.randn(shape, device=device).to(dtype)
    xt = x.clone().requires_grad_()
    y = gacd_fast.l2_normalize(xt, backend="triton")
    y.backward(dy)
    xr = x.double().requires_grad_()
    yr = R.l2_normalize(xr)
    yr.backward(dy.double())
    assert y.dtype == dtype and xt.grad.dtype == dtype
    assert_close(y, yr, dtype, "normalize")
    assert_close(xt.grad, xr.grad, dtype, "d normalize")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_similarity(device, shape, dtype):
    a, b = _rows(shape, dtype, device), torch.randn(shape, device=device).to(dtype)
    g = torch.randn(shape[0], device=device)
    at, bt = a.clone().requires_grad_(), b.clone().requires_grad_()
    c = gacd_fast.cosine_similarity(at, bt, backend="triton")
    c.backward(g)
    ar, br = a.double().requires_grad_(), b.double().requires_grad_()
    cr = R.cosine_similarity(ar, br)
    cr.backward(g.double())
    assert c.dtype == torch.float32
    assert_close(c, cr, dtype, "cosine")
    assert_close(at.grad, ar.grad, dtype, "d cosine / d a")
    assert_close(bt.grad, br.grad, dtype, "d cosine / d b")


def test_zero_rows(device):
    # F.normalize: a zero row stays zero; its gradient is dy / eps (the clamp has no gradient)
    x = torch.randn(4, 9, device=device)
    x[1] = 0
    xt, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    dy = torch.randn(4, 9, device=device)
    TB.l2_normalize(xt).backward(dy)
    R.l2_normalize(xr).backward(dy.double())
    assert torch.equal(TB.l2_normalize(x)[1], torch.zeros(9, device=device))
    torch.testing.assert_close(xt.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    b = torch.randn(4, 9, device=device)
    assert float(TB.cosine_similarity(x, b)[1]) == 0.0


def test_one_side_grad_and_float64(device):
    a, b = torch.randn(7, 13, device=device), torch.randn(7, 13, device=device)
    at = a.clone().requires_grad_()
    TB.cosine_similarity(at, b).sum().backward()
    ar = a.double().requires_grad_()
    R.cosine_similarity(ar, b.double()).sum().backward()
    assert_close(at.grad, ar.grad, torch.float32, "d a only")
    a64 = a.double().requires_grad_()
    assert TB.cosine_similarity(a64, b.double()).dtype == torch.float64
    assert TB.l2_normalize(a64).dtype == torch.float64


def test_deterministic(device):
    a, b = torch.randn(33, 300, device=device), torch.randn(33, 300, device=device)
    runs = []
    for _ in range(2):
        at, bt = a.clone().requires_grad_(), b.clone().requires_grad_()
        c = TB.cosine_similarity(at, bt)
        (c.sum() + TB.l2_normalize(at).square().mul(torch.arange(300, device=device)).sum()).backward()
        runs.append((c, at.grad, bt.grad))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def test_opcheck(device):
    a, b = torch.randn(5, 31, device=device), torch.randn(5, 31, device=device)
    ops = torch.ops.gacd_triton
    torch.library.opcheck(ops.l2_normalize.default, (a.clone().requires_grad_(),))
    torch.library.opcheck(ops.cosine_similarity.default, (a.clone().requires_grad_(), b.clone().requires_grad_()))
    torch.library.opcheck(ops.l2_normalize_backward.default, (b, a))
    torch.library.opcheck(ops.cosine_similarity_backward.default, (torch.randn(5, device=device), a, b))


def test_compile_fullgraph(device):
    a, b = torch.randn(6, 20, device=device), torch.randn(6, 20, device=device)

    def f(x, y):
        return gacd_fast.cosine_similarity(x, y, backend="triton").sum() + gacd_fast.l2_normalize(x, backend="triton").sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    at, bt = a.clone().requires_grad_(), b.clone().requires_grad_()
    compiled(at, bt).backward()
    ae, be = a.clone().requires_grad_(), b.clone().requires_grad_()
    f(ae, be).backward()
    assert torch.equal(at.grad, ae.grad) and torch.equal(bt.grad, be.grad)
