"""The reference ops and the torch backend's chunked path against the oracles (tests/oracles.py),
the weighted reduction and nce_loss. Each backend's values at small odd shapes are in
tests/test_conformance.py."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import gacd_fast
import oracles
from gacd_fast.ops import chunked, reference
from inputs import info_nce_inputs
from tolerances import assert_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1, 1), (3, 5, 2, 1), (17, 129, 31, 7), (64, 1000, 128, 129)]  # B, K, D, M


def make_inputs(B, K, D, M, dtype, *, grad=True, bank_grad=True, indexed=False):
    return info_nce_inputs(B, K, D, M if indexed else None, dtype, grad=(grad, grad, bank_grad))


@pytest.mark.parametrize("B,K,D,M", SHAPES[:3])
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_oracle(B, K, D, M, indexed, normalize):
    q, p, n, idx = make_inputs(B, K, D, M, torch.float64, indexed=indexed)
    got = reference.info_nce_rows(q, p, n, idx, 0.07, normalize)
    assert_close(got, oracles.info_nce_rows(q, p, n, idx, 0.07, normalize), torch.float64, "info_nce rows")


@pytest.mark.parametrize("B,K,D,M", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("bank_grad", [False, True])
def test_chunked_matches_plain(B, K, D, M, dtype, indexed, bank_grad):
    """Values and gradients of the lean path equal the oracle's; chunk=7 forces many chunks."""
    q, p, n, idx = make_inputs(B, K, D, M, dtype, bank_grad=bank_grad, indexed=indexed)
    g = torch.rand(B, dtype=torch.float64)
    want = reference.info_nce_rows(q, p, n, idx, 0.1, True)
    got = chunked.info_nce_rows(q, p, n, idx, 0.1, True, chunk=7)
    assert got.dtype == torch.float32
    inputs = [q, p, n] if bank_grad else [q, p]
    g_want = torch.autograd.grad((want * g.float()).sum(), inputs)
    g_got = torch.autograd.grad((got * g.float()).sum(), inputs)
    # the oracle in float64 on the same (rounded) inputs
    q64, p64, n64 = (t.detach().double().requires_grad_() for t in (q, p, n))
    want64 = oracles.info_nce_rows(q64, p64, n64, idx, 0.1, True)
    g64 = torch.autograd.grad((want64 * g).sum(), [q64, p64, n64][: len(inputs)])
    assert_close(got, want64, torch.float32, "loss vs float64")
    assert_close(want, want64, torch.float32, "oracle vs float64")
    for name, a, b, e in zip("qpn", g_got, g_want, g64):
        assert a.dtype == dtype, f"grad {name} dtype"
        assert_close(a, e, dtype, f"grad {name} vs float64")
        assert_close(a, b, dtype, f"grad {name} vs oracle")


@pytest.mark.parametrize("indexed", [False, True])
@pytest.mark.parametrize("bank_grad", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_chunked(indexed, bank_grad, normalize):
    q, p, n, idx = make_inputs(4, 9, 5, 6, torch.float64, bank_grad=bank_grad, indexed=indexed)
    fn = lambda *t: chunked.info_nce_rows(*t[:2], t[2] if bank_grad else n, idx, 0.5, normalize, chunk=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, p, n) if bank_grad else (q, p))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("indexed", [False, True])
def test_gradcheck_public_info_nce(reduction, indexed):
    q, p, n, idx = make_inputs(5, 11, 3, 4, torch.float64, indexed=indexed)
    w = torch.tensor([0.0, 1.0, 0.5, 2.0, 0.25], dtype=torch.float64)
    fn = lambda q, p, n: gacd_fast.info_nce(q, p, n, weights=w, neg_index=idx, reduction=reduction, temperature=0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, p, n))
    assert torch.autograd.gradcheck(lambda q, p, n: reference.info_nce_rows(q, p, n, idx, 0.3, True), (q, p, n))


def test_weighted_reductions():
    q, p, n, _ = make_inputs(6, 13, 4, 1, torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    rows = oracles.info_nce_rows(q, p, n, None, 0.07, True)
    none = gacd_fast.info_nce(q, p, n, weights=w, reduction="none")
    assert_close(none, w * rows, torch.float64, "none")
    assert_close(gacd_fast.info_nce(q, p, n, weights=w, reduction="sum"), (w * rows).sum(), torch.float64, "sum")
    assert_close(gacd_fast.info_nce(q, p, n, weights=w, reduction="mean"), (w * rows).sum() / w.sum(), torch.float64, "mean")
    assert_close(gacd_fast.info_nce(q, p, n), rows.mean(), torch.float64, "unweighted mean")
    # a zero-weight row gets no gradient
    (gq,) = torch.autograd.grad(gacd_fast.info_nce(q, p, n, weights=w), [q])
    assert gq[0].abs().max() == 0 and gq[3].abs().max() == 0 and gq[1].abs().max() > 0


def test_weights_are_constants():
    q, p, n, _ = make_inputs(3, 7, 4, 1, torch.float64)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    loss = gacd_fast.info_nce(q, p, n, weights=w)
    assert torch.autograd.grad(loss, [w], allow_unused=True)[0] is None


def test_nan_propagates():
    q, p, n, _ = make_inputs(3, 7, 4, 1, torch.float32, grad=False, bank_grad=False)
    q[1, 0] = float("nan")
    out = gacd_fast.info_nce(q, p, n, reduction="none")
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()
    assert torch.isnan(gacd_fast.info_nce(q, p, n))


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 9), K=st.integers(1, 40), D=st.integers(1, 12), M=st.integers(1, 9),
       indexed=st.booleans(), tau=st.floats(0.02, 5.0), chunk=st.integers(1, 50))
def test_chunked_property(B, K, D, M, indexed, tau, chunk):
    q, p, n, idx = make_inputs(B, K, D, M, torch.float64, indexed=indexed)
    got = chunked.info_nce_rows(q, p, n, idx, tau, True, chunk=chunk)
    assert_close(got, oracles.info_nce_rows(q, p, n, idx, tau, True), torch.float64, "chunked vs oracle")


def test_chunked_never_holds_b_by_k(monkeypatch):
    """With a small chunk budget the largest temporary stays a chunk, not B x K."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 64 * 100)
    seen = []
    orig = chunked._scores

    def spy(*a):
        s, rows = orig(*a)
        seen.append(s.numel())
        return s, rows

    monkeypatch.setattr(chunked, "_scores", spy)
    q, p, n, _ = make_inputs(64, 5000, 8, 1, torch.float32)
    chunked.info_nce_rows(q, p, n, None, 0.07, True).sum().backward()
    assert max(seen) <= 64 * 100 and len(seen) > 1


def test_bank_update_after_forward_is_safe_for_backward():
    """The bank (no grad) is not saved: writing it in place after forward leaves backward exact."""
    q, p, n, _ = make_inputs(4, 10, 6, 1, torch.float64, bank_grad=False)
    loss = chunked.info_nce_rows(q, p, n, None, 0.2, True).sum()
    want = torch.autograd.grad(oracles.info_nce_rows(q, p, n, None, 0.2, True).sum(), [q])[0]
    n.mul_(0).add_(1)
    assert_close(torch.autograd.grad(loss, [q])[0], want, torch.float64, "dq")


def test_nce_matches_formula():
    q, p, n, idx = make_inputs(5, 30, 8, 6, torch.float64, indexed=True)
    got = gacd_fast.nce_loss(q, p, n, neg_index=idx, num_data=30, temperature=0.5, reduction="none")
    assert_close(got, oracles.nce_rows(q, p, n, idx, 0.5, True, 30), torch.float64, "nce")
    assert torch.autograd.gradcheck(
        lambda q, p: gacd_fast.nce_loss(q, p, n, neg_index=idx, num_data=30), (q, p))
