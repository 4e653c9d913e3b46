"""Triton InfoNCE, what only this backend has: several tiles, split-K, opcheck, determinism,
dq in forward, huge norms and infinite logits. Values and gradients at small odd shapes on every
backend are in tests/test_conformance.py."""
from __future__ import annotations

import os

import pytest
import torch

import gacd_fast
import oracles
from checks import check_info_nce
from gacd_fast.kernels import info_nce as KN
from inputs import info_nce_inputs
from tolerances import assert_close

DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else (["cuda"] if torch.cuda.is_available() else [])
pytestmark = [pytest.mark.parametrize("device", DEVICES)] + ([pytest.mark.interpreter] if DEVICES == ["cpu"] else [])


@pytest.fixture(autouse=True)
def _default_splits():
    KN.config.num_splits = None
    yield
    KN.config.num_splits = None


# (B, K, D, M) beyond one tile under the interpreter: B > 64 query rows, K > 512 bank rows, D > 256
# (D looped), M > 1024 gathered rows
TILE_SHAPES = [(70, 40, 20, None), (3, 1100, 31, None), (4, 60, 1000, 7), (2, 30, 8, 1100)]


@pytest.mark.slow
@pytest.mark.parametrize("shape", TILE_SHAPES, ids=str)
def test_several_tiles(device, shape):
    check_info_nce("triton", *info_nce_inputs(*shape, device=device))


@pytest.mark.parametrize("M", [None, 11])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_k(device, M, splits):
    # force several split-K chunks (the default under the interpreter is one) to test the combine
    KN.config.num_splits = splits
    check_info_nce("triton", *info_nce_inputs(9, 301, 40, M, device=device), reduction="sum")


@pytest.mark.slow
@pytest.mark.parametrize("M", [None, 37])
def test_deterministic(device, M):
    KN.config.num_splits = 3
    q, p, n, idx = info_nce_inputs(19, 777, 48, M, device=device)
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (q, p, n)]
        loss = gacd_fast.info_nce(*ts, neg_index=idx, reduction="none", backend="triton")
        loss.backward(torch.linspace(0.1, 2, 19, device=device))
        runs.append([loss] + [t.grad for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("M", [None, 4])
def test_opcheck(device, M):
    q, p, n, idx = info_nce_inputs(3, 10, 7, M, device=device)
    ops = torch.ops.gacd_triton
    args = (q.clone().requires_grad_(), p.clone().requires_grad_(), n.clone().requires_grad_(), idx, 0.07, True)
    for compute_dq in (False, True):
        torch.library.opcheck(ops.info_nce_forward.default, args + (compute_dq,))
    loss, lse, dq_neg = ops.info_nce_forward(q, p, n, idx, 0.07, True, True)
    g = torch.rand(3, device=device)
    torch.library.opcheck(ops.info_nce_backward.default, (g, q, p, n, idx, lse, None, 0.07, True, True, True, True))
    torch.library.opcheck(ops.info_nce_backward.default, (g, q, p, None, idx, lse, dq_neg, 0.07, True, True, True, False))
    torch.library.opcheck(ops.info_nce_backward.default, (g, q, p, n, idx, lse, None, 0.07, True, False, False, True))


@pytest.mark.slow
@pytest.mark.parametrize("M", [None, 5])
@pytest.mark.parametrize("D", [24, 300])
def test_dq_in_forward_matches_deferred(device, M, D):
    """A frozen bank: dq comes from forward (D <= 256 in the forward kernel, wider by the dq kernel
    at forward time); the bank is not saved; values equal the deferred path's to rounding."""
    KN.config.num_splits = 2
    q, p, n, idx = info_nce_inputs(6, 70, D, M, device=device)
    check_info_nce("triton", q, p, n, idx, need=(True, True, False), reduction="none")
    qt = q.clone().requires_grad_()
    loss, lse, dq_neg = torch.ops.gacd_triton.info_nce_forward(qt, p, n, idx, 0.07, True, True)
    want, _ = KN._dq_neg(q, n, idx, KN._norms(q, True), KN._norms(n, True), lse, torch.ones_like(lse), 1 / 0.07,
                         want_coef=False)
    assert_close(dq_neg, want, torch.float32, "dq_neg")


@pytest.mark.parametrize("M", [None, 6])
def test_huge_norm_rows(device, M):
    """normalize=True with float32 rows of norm ~1e19..1e38: finite and equal to the float64 value."""
    q, p, n, idx = info_nce_inputs(5, 40, 24, M, device=device)
    mags = torch.tensor([1e19, 1e25, 1e30, 1e37, 1.0], device=device)
    q, p = q / q.norm(dim=1, keepdim=True) * mags[:, None], p * 1e20
    n = n / n.norm(dim=1, keepdim=True) * torch.logspace(0, 38, 40, device=device)[:, None]
    out = check_info_nce("triton", q, p, n, idx, reduction="none", need=(True, True, True))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("M", [None, 6])
def test_infinite_logits(device, M):
    """normalize=False: a +inf logit gives a +inf row (torch.logsumexp semantics), NaN gives NaN."""
    q, p, n, idx = info_nce_inputs(4, 30, 8, M, device=device)
    q[0, 0] = float("inf")  # +-inf logits in row 0 (and s_pos = +-inf): whatever torch gives
    n[3] = 0.0
    n[3, 1] = float("inf")  # +inf logit in every row that sees bank row 3 where q[:, 1] > 0
    q[:, 1] = q[:, 1].abs()
    q[2, 2] = float("nan")
    idx = None if idx is None else torch.cat([idx, torch.full((4, 1), 3, dtype=idx.dtype)], 1)
    got = gacd_fast.info_nce(q, p, n, neg_index=idx, normalize=False, reduction="none", backend="triton")
    want = oracles.info_nce_rows(q.double(), p.double(), n.double(), idx, 0.07, False)
    assert_close(got, want, torch.float32, "loss")
    assert torch.isposinf(got[1]) and torch.isnan(got[2])
