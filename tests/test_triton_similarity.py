"""Triton normalize / cosine_similarity, what only this backend has: float64 fallback dtypes,
determinism, opcheck, torch.compile. Values and gradients on every backend are in
tests/test_conformance.py."""
from __future__ import annotations

import os

import pytest
import torch

import gacd_fast
from gacd_fast.ops import triton_backend as TB

DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else (["cuda"] if torch.cuda.is_available() else [])
pytestmark = [pytest.mark.parametrize("device", DEVICES)] + ([pytest.mark.interpreter] if DEVICES == ["cpu"] else [])

def test_float64_stays_float64(device):
    a64 = torch.randn(7, 13, device=device, dtype=torch.float64, requires_grad=True)
    assert TB.cosine_similarity(a64, a64.detach() + 1).dtype == torch.float64
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
