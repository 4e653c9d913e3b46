"""Triton InfoNCE (values and every gradient) against the reference, through the public API."""
from __future__ import annotations

import os

import pytest
import torch

import gacd_fast
from gacd_fast.functional import weighted_reduce
from gacd_fast.kernels import info_nce as KN
from gacd_fast.ops import reference as R
from gacd_fast.ops import triton_backend as TB
from tolerances import assert_close

DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _default_splits():
    KN.config.num_splits = None
    yield
    KN.config.num_splits = None


def _inputs(B, K, D, M, dtype, device, idx_dtype=torch.int64):
    q = torch.randn(B, D, device=device).to(dtype)
    p = (q.float() + 0.5 * torch.randn(B, D, device=device)).to(dtype)  # positives correlate
    n = torch.randn(K, D, device=device).to(dtype)
    idx = None if M is None else torch.randint(0, K, (B, M), device=device, dtype=idx_dtype)
    return q, p, n, idx


def _check(q, p, n, idx, dtype, *, normalize=True, reduction="mean", weights=None, need=(True, True, True),
           temperature=0.07):
    """Loss and the gradients of the inputs in ``need`` vs the float64 oracle of the same inputs."""
    ts = [t.clone().requires_grad_(r) for t, r in zip((q, p, n), need)]
    rs = [t.double().requires_grad_(r) for t, r in zip((q, p, n), need)]
    kw = dict(temperature=temperature, weights=weights, neg_index=idx, normalize=normalize, reduction=reduction)
    out = gacd_fast.info_nce(*ts, backend="triton", **kw)
    want = weighted_reduce(R.info_nce_rows(*rs, idx, temperature, normalize),
                           None if weights is None else weights.double(), reduction)
    assert out.dtype == torch.float32
    assert_close(out, want, dtype, "loss")
    g = torch.rand(out.shape, device=out.device) if out.dim() else torch.tensor(1.0, device=out.device)
    out.backward(g)
    want.backward(g.double())
    for name, t, r in zip(("query", "positive", "negatives"), ts, rs):
        if t.requires_grad:
            assert t.grad.dtype == dtype
            assert_close(t.grad, r.grad, dtype, f"d loss / d {name}")
    return out, [t.grad for t in ts]


# (B, K, D, M): odd sizes, K below one block, M = 1, D = 1 / not a power of two / 1024
SHAPES = [(1, 1, 1, None), (3, 17, 31, None), (5, 37, 200, 1), (17, 300, 31, 33), (64, 4096, 200, None),
          (64, 1000, 64, 129), (2, 50, 1024, None), (4, 60, 1000, 7)]


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_all_grads(device, shape):
    B, K, D, M = shape
    _check(*_inputs(B, K, D, M, torch.float32, device), torch.float32)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("M", [None, 9])
def test_reductions_and_zero_weights(device, reduction, M):
    q, p, n, idx = _inputs(13, 70, 31, M, torch.float32, device)
    w = torch.rand(13, device=device) * 2
    w[::3] = 0
    _check(q, p, n, idx, torch.float32, reduction=reduction, weights=w)


def test_all_weights_zero_mean(device):
    q, p, n, _ = _inputs(6, 20, 8, None, torch.float32, device)
    qt = q.clone().requires_grad_()
    out = gacd_fast.info_nce(qt, p, n, weights=torch.zeros(6, device=device), backend="triton")
    out.backward()
    assert float(out.detach()) == 0.0 and torch.count_nonzero(qt.grad) == 0


@pytest.mark.parametrize("M", [None, 11])
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_k(device, M, splits):
    # force several split-K chunks (the default under the interpreter is one) to test the combine
    KN.config.num_splits = splits
    _check(*_inputs(9, 301, 40, M, torch.float32, device), torch.float32, reduction="sum")


@pytest.mark.parametrize("M", [None, 21])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True), (True, False, True)])
def test_grad_subsets(device, M, need):
    _check(*_inputs(7, 90, 33, M, torch.float32, device), torch.float32, need=need, reduction="none")


@pytest.mark.parametrize("M", [None, 5])
def test_no_normalize(device, M):
    q, p, n, idx = _inputs(11, 45, 19, M, torch.float32, device)
    _check(q * 0.2, p * 0.2, n * 0.2, idx, torch.float32, normalize=False, temperature=0.5)


def test_int32_index_with_repeats(device):
    q, p, n, _ = _inputs(10, 12, 24, None, torch.float32, device)
    idx = torch.randint(0, 12, (10, 40), device=device, dtype=torch.int32)  # many repeated rows
    idx[:, 0] = 3
    _check(q, p, n, idx, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 17, 31, None), (33, 500, 200, None), (9, 100, 64, 17)])
def test_half_precision(device, dtype, shape):
    _check(*_inputs(*shape, dtype, device), dtype, reduction="sum")


def test_float64_uses_torch(device):
    q, p, n, idx = _inputs(4, 9, 5, 3, torch.float64, device)
    want = R.info_nce_rows(q, p, n, idx, 0.1, True)
    got = TB.info_nce_rows(q, p, n, idx, 0.1, True)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("M", [None, 37])
def test_deterministic(device, M):
    KN.config.num_splits = 3
    q, p, n, idx = _inputs(19, 777, 48, M, torch.float32, device)
    runs = []
    for _ in range(2):
        ts = [t.clone().requires_grad_() for t in (q, p, n)]
        loss = gacd_fast.info_nce(*ts, neg_index=idx, reduction="none", backend="triton")
        loss.backward(torch.linspace(0.1, 2, 19, device=device))
        runs.append([loss] + [t.grad for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_no_bank_sized_outputs_when_bank_frozen(device):
    # a frozen bank (no grad) gets no gradient, and the positive-only path needs no dq kernel
    q, p, n, _ = _inputs(5, 64, 16, None, torch.float32, device)
    pt = p.clone().requires_grad_()
    gacd_fast.info_nce(q, pt, n, backend="triton").backward()
    pr = p.double().requires_grad_()
    R.info_nce_rows(q.double(), pr, n.double(), None, 0.07, True).mean().backward()
    assert_close(pt.grad, pr.grad, torch.float32, "d positive")


@pytest.mark.parametrize("M", [None, 4])
def test_opcheck(device, M):
    q, p, n, idx = _inputs(3, 10, 7, M, torch.float32, device)
    ops = torch.ops.gacd_triton
    args = (q.clone().requires_grad_(), p.clone().requires_grad_(), n.clone().requires_grad_(), idx, 0.07, True)
    for compute_dq in (False, True):
        torch.library.opcheck(ops.info_nce_forward.default, args + (compute_dq,))
    loss, lse, dq_neg = ops.info_nce_forward(q, p, n, idx, 0.07, True, True)
    g = torch.rand(3, device=device)
    torch.library.opcheck(ops.info_nce_backward.default, (g, q, p, n, idx, lse, None, 0.07, True, True, True, True))
    torch.library.opcheck(ops.info_nce_backward.default, (g, q, p, None, idx, lse, dq_neg, 0.07, True, True, True, False))
    torch.library.opcheck(ops.info_nce_backward.default, (g, q, p, n, idx, lse, None, 0.07, True, False, False, True))


@pytest.mark.parametrize("M", [None, 5])
@pytest.mark.parametrize("D", [24, 300])
def test_dq_in_forward_matches_deferred(device, M, D):
    """A frozen bank: dq comes from forward (D <= 256 in the forward kernel, wider by the dq kernel
    at forward time); the bank is not saved; values equal the deferred path's to rounding."""
    KN.config.num_splits = 2
    q, p, n, idx = _inputs(6, 70, D, M, torch.float32, device)
    _check(q, p, n, idx, torch.float32, need=(True, True, False), reduction="none")
    qt = q.clone().requires_grad_()
    loss, lse, dq_neg = torch.ops.gacd_triton.info_nce_forward(qt, p, n, idx, 0.07, True, True)
    want, _ = KN._dq_neg(q, n, idx, KN._norms(q, True), KN._norms(n, True), lse, torch.ones_like(lse), 1 / 0.07,
                         want_coef=False)
    assert_close(dq_neg, want, torch.float32, "dq_neg")


@pytest.mark.parametrize("M", [None, 6])
def test_huge_norm_rows(device, M):
    """normalize=True with float32 rows of norm ~1e19..1e38: finite and equal to the float64 value."""
    q, p, n, idx = _inputs(5, 40, 24, M, torch.float32, device)
    mags = torch.tensor([1e19, 1e25, 1e30, 1e37, 1.0], device=device)
    q, p = q / q.norm(dim=1, keepdim=True) * mags[:, None], p * 1e20
    n = n / n.norm(dim=1, keepdim=True) * torch.logspace(0, 38, 40, device=device)[:, None]
    out, _ = _check(q, p, n, idx, torch.float32, reduction="none", need=(True, True, True))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("M", [None, 6])
def test_infinite_logits(device, M):
    """normalize=False: a +inf logit gives a +inf row (torch.logsumexp semantics), NaN gives NaN."""
    q, p, n, idx = _inputs(4, 30, 8, M, torch.float32, device)
    q[0, 0] = float("inf")  # +-inf logits in row 0 (and s_pos = +-inf): whatever torch gives
    n[3] = 0.0
    n[3, 1] = float("inf")  # +inf logit in every row that sees bank row 3 where q[:, 1] > 0
    q[:, 1] = q[:, 1].abs()
    q[2, 2] = float("nan")
    idx = None if idx is None else torch.cat([idx, torch.full((4, 1), 3, dtype=idx.dtype)], 1)
    got = gacd_fast.info_nce(q, p, n, neg_index=idx, normalize=False, reduction="none", backend="triton")
    want = R.info_nce_rows(q.double(), p.double(), n.double(), idx, 0.07, False)
    assert_close(got, want, torch.float32, "loss")
    assert torch.isposinf(got[1]) and torch.isnan(got[2])
