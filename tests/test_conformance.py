"""Every backend that runs on CPU against the float64 oracles of tests/oracles.py, through the public
API (``gacd_fast.info_nce(..., backend=name)`` etc.): values and gradients, per op x dtype x odd
shapes, at the tolerance of tests/tolerances.py.

Backends: ``gacd_fast.available_backends("cpu")``: torch; triton under the interpreter that
tests/conftest.py sets (its tests carry the ``interpreter`` marker); cext when the extension can be
built here (the first cext test builds it). Shapes are small (the interpreter is slow) and never
only powers of two. Backend-specific behaviour (opcheck, torch.compile, split-K, determinism, ...)
is tested in each backend's own module.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import gacd_fast
import oracles
from checks import assert_grads_close, backend_params, check_info_nce, leaves, result_dtype
from inputs import info_nce_inputs, pgd_images
from tolerances import assert_close

BACKENDS = backend_params(gacd_fast.available_backends("cpu"))
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in
          (torch.float32, torch.float64, torch.float16, torch.bfloat16)]
LOW_PRECISION = (torch.float16, torch.bfloat16)


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


# ------------------------------------------------------------------------------------- info_nce
@dataclass(frozen=True)
class NceCase:
    """One shape (B, K, D; M negatives a row when indexed) with the options it runs under."""
    B: int
    K: int
    D: int
    M: int
    reduction: str = "mean"
    weights: str | None = None  # None, "random" or "some_zero" (every third row, from the second)
    normalize: bool = True
    bank_grad: bool = True  # False: a frozen bank (the backends' dq-in-forward paths)
    idx_dtype: torch.dtype = torch.int64


NCE_CASES = {
    "1x1x1": NceCase(1, 1, 1, 1),
    "odd-frozen-bank": NceCase(3, 17, 5, 3, reduction="sum", weights="some_zero", bank_grad=False),
    "unnormalized-int32": NceCase(5, 33, 31, 9, reduction="none", normalize=False, idx_dtype=torch.int32),
    "repeats": NceCase(6, 4, 7, 11, reduction="sum"),  # indexed: M > K, rows repeat within a row
    "wide-D": NceCase(3, 7, 300, 5, weights="random"),  # D above the Triton kernels' resident width
}


def _weights(kind: str | None, B: int) -> torch.Tensor | None:
    if kind is None:
        return None
    w = torch.rand(B) * 2
    if kind == "some_zero":
        w[1::3] = 0
    return w


@pytest.mark.parametrize("case", NCE_CASES.values(), ids=NCE_CASES.keys())
@pytest.mark.parametrize("mode", ["shared", "indexed"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_info_nce(backend, case, mode, dtype):
    q, p, n, idx = info_nce_inputs(case.B, case.K, case.D, case.M if mode == "indexed" else None, dtype,
                                   idx_dtype=case.idx_dtype, scale=1.0 if case.normalize else 0.2)
    tau = 0.07 if case.normalize else 0.5
    check_info_nce(backend, q, p, n, idx, need=(True, True, case.bank_grad), temperature=tau,
                   weights=_weights(case.weights, case.B), normalize=case.normalize, reduction=case.reduction)


@pytest.mark.parametrize("mode", ["shared", "indexed"])
@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True)], ids=["query", "positive", "negatives", "query+negatives"])
def test_info_nce_grad_subsets(backend, mode, need):
    """Only some inputs require grad (the backends skip the others' kernels)."""
    q, p, n, idx = info_nce_inputs(7, 19, 13, 5 if mode == "indexed" else None)
    check_info_nce(backend, q, p, n, idx, need=need, reduction="none")


def test_info_nce_all_zero_weights(backend):
    """"mean" with weights summing to 0 is exactly 0, with exactly zero gradients."""
    q, p, n, _ = info_nce_inputs(3, 7, 5, None)
    tested, _ = leaves((q, p, n), (True, True, True))
    loss = gacd_fast.info_nce(*tested, weights=torch.zeros(3), backend=backend)
    assert loss.item() == 0.0
    for g in torch.autograd.grad(loss, tested):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("mode", ["shared", "indexed"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("bank_grad", [True, False])
def test_info_nce_gradcheck(backend, mode, normalize, bank_grad):
    q, p, n, idx = info_nce_inputs(3, 11, 5, 4 if mode == "indexed" else None, torch.float64)
    w = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    tau = 0.3 if normalize else 2.0

    def loss(q, p, *bank):
        negatives = bank[0] if bank_grad else n
        return gacd_fast.info_nce(q, p, negatives, temperature=tau, weights=w, neg_index=idx, normalize=normalize,
                                  backend=backend)

    args = [t.requires_grad_() for t in ((q, p, n) if bank_grad else (q, p))]
    assert torch.autograd.gradcheck(loss, args)


@pytest.mark.parametrize("case", NCE_CASES.values(), ids=NCE_CASES.keys())
@pytest.mark.parametrize("mode", ["shared", "indexed"])
@pytest.mark.parametrize("dtype", [pytest.param(d, id=str(d).removeprefix("torch.")) for d in LOW_PRECISION])
def test_info_nce_half_products(backend, case, mode, dtype, monkeypatch):
    """bf16/fp16 multiplied in their own dtype with float32 sums (the path of CPUs with
    AVX512-BF16/AMX, forced here): still within the dtype's tolerance. The Triton kernels have
    no switch (their half dots are always half)."""
    if backend == "triton":
        pytest.skip("the switch is the CPU backends'")
    monkeypatch.setenv("GACD_FAST_LOWP_PRODUCTS", "1")
    test_info_nce(backend, case, mode, dtype)


# ----------------------------------------------------------------------- normalize, cosine_similarity
ROW_SHAPES = [(1, 1), (3, 5), (17, 31), (3, 1030)]  # D = 1030: more than one Triton block of a row


def _rows(shape, dtype):
    x = torch.randn(shape, dtype=torch.float64)
    if shape[1] > 1:  # a short row (for D = 1 the exact gradient is 0: only cancellation error)
        x[0] *= 0.05
    return x.to(dtype)


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize(backend, shape, dtype):
    tested, twins = leaves((_rows(shape, dtype),), (True,))
    y = gacd_fast.l2_normalize(tested[0], backend=backend)
    want = oracles.normalize(twins[0])
    assert y.dtype == dtype
    assert_close(y, want, dtype, "normalize")
    assert_grads_close(y, want, tested, twins, dtype, ("x",))


@pytest.mark.parametrize("shape", ROW_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cosine_similarity(backend, shape, dtype):
    tested, twins = leaves((_rows(shape, dtype), _rows(shape, dtype)), (True, True))
    c = gacd_fast.cosine_similarity(*tested, backend=backend)
    want = oracles.cosine_similarity(*twins)
    assert c.dtype == result_dtype(dtype)
    assert_close(c, want, dtype, "cosine_similarity")
    assert_grads_close(c, want, tested, twins, dtype, ("a", "b"))


def test_cosine_similarity_one_side(backend):
    """Only ``a`` requires grad (the backends skip the other input's gradient)."""
    tested, twins = leaves((_rows((7, 13), torch.float32), _rows((7, 13), torch.float32)), (True, False))
    c = gacd_fast.cosine_similarity(*tested, backend=backend)
    assert_grads_close(c, oracles.cosine_similarity(*twins), tested, twins, torch.float32, ("a", "b"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_and_tiny_rows(backend, dtype):
    """F.normalize below eps: a zero row stays zero, a tiny row is x / eps; the Jacobian there is
    I / eps (the clamp has no gradient); a zero row's cosine is 0."""
    x = _rows((4, 9), dtype)
    x[1] = 0
    x[2] = 1e-14
    tested, twins = leaves((x,), (True,))
    y = gacd_fast.l2_normalize(tested[0], backend=backend)
    assert torch.equal(y[1], torch.zeros(9, dtype=dtype))
    want = oracles.normalize(twins[0])
    assert_close(y, want, dtype, "normalize")
    assert_grads_close(y, want, tested, twins, dtype, ("x",))
    assert float(gacd_fast.cosine_similarity(x, _rows((4, 9), dtype), backend=backend)[1]) == 0.0


@pytest.mark.parametrize("shape", ROW_SHAPES[:3], ids=str)
def test_rows_gradcheck(backend, shape):
    a, b = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda x: gacd_fast.l2_normalize(x, backend=backend), (a,))
    assert torch.autograd.gradcheck(lambda x, y: gacd_fast.cosine_similarity(x, y, backend=backend), (a, b))


# ------------------------------------------------------------------------------------------ pgd_step_
IMAGE_SHAPES = [(1, 1), (3, 5, 7), (5, 3, 7, 9)]
STEPS = {"linf": (2 / 255, 8 / 255), "l2": (0.5, 0.3)}  # l2: steps past the ball, so it projects


def _step_sizes(norm: str, batch: int, per_sample: bool):
    alpha, eps = STEPS[norm]
    if per_sample:
        return torch.rand(batch) * 2 * alpha, torch.rand(batch) * 2 * eps
    return alpha, eps


def _assert_linf_step(got, x_adv, grad, x_nat, alpha, eps, clip, backend):
    """linf: the bits of torchattacks' op order in the images' dtype (oracles.pgd_linf_step on the
    same dtype). The one exception: the Triton interpreter rounds fp32 -> bf16 by truncation (a GPU
    rounds to nearest), so triton bfloat16 may be one bf16 ulp off."""
    want = oracles.pgd_linf_step(x_adv, grad, x_nat, alpha, eps, *clip)
    if backend == "triton" and got.dtype == torch.bfloat16:
        assert (got.double() - want.double()).abs().max() <= torch.finfo(torch.bfloat16).eps
    else:
        assert torch.equal(got, want), f"max diff {(got.double() - want.double()).abs().max():.3e}"


def _assert_l2_step(got, x_adv, grad, x_nat, alpha, eps, clip):
    """l2 vs the float64 step: float32/float64 at the tolerance table; float16/bfloat16 within one
    ulp of the largest pixel value (1.0), i.e. one rounding of the result and one of an intermediate."""
    want = oracles.pgd_l2_step(x_adv, grad, x_nat, alpha, eps, *clip)
    if got.dtype in LOW_PRECISION:
        assert (got.double() - want).abs().max() <= torch.finfo(got.dtype).eps
    else:
        assert_close(got, want, got.dtype, "l2 step")


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per-sample"])
def test_pgd_step(backend, norm, shape, dtype, per_sample):
    x_adv, grad, x_nat = pgd_images(shape, dtype, zero_grad_sample=shape[0] > 1)
    alpha, eps = _step_sizes(norm, shape[0], per_sample)
    got = x_adv.clone()
    out = gacd_fast.pgd_step_(got, grad, x_nat, alpha=alpha, eps=eps, norm=norm, backend=backend)
    assert out is got and got.dtype == dtype
    if norm == "linf":
        _assert_linf_step(got, x_adv, grad, x_nat, alpha, eps, (0.0, 1.0), backend)
    else:
        _assert_l2_step(got, x_adv, grad, x_nat, alpha, eps, (0.0, 1.0))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_step_clip_range_and_strides(backend, norm):
    """A narrower clip range and a non-contiguous x_adv (written in place, strides kept)."""
    x_adv, grad, x_nat = pgd_images((6, 4, 5))
    strided = x_adv.transpose(0, 2).contiguous().transpose(0, 2)
    assert not strided.is_contiguous()
    alpha, eps = STEPS[norm]
    gacd_fast.pgd_step_(strided, grad, x_nat, alpha=alpha, eps=eps, clip_min=0.2, clip_max=0.7, norm=norm,
                        backend=backend)
    assert not strided.is_contiguous()
    if norm == "linf":
        _assert_linf_step(strided, x_adv, grad, x_nat, alpha, eps, (0.2, 0.7), backend)
    else:
        _assert_l2_step(strided, x_adv, grad, x_nat, alpha, eps, (0.2, 0.7))


# ----------------------------------------------------------------------------------- pgd_random_start
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per-sample"])
def test_pgd_random_start(backend, norm, dtype, per_sample):
    """A new tensor of x's shape and dtype, inside the eps-ball and [0, 1], reproducible for a
    generator state, different for another; a sample with eps 0 stays where it is."""
    x = pgd_images((5, 3, 7, 9), dtype)[2]
    eps = torch.tensor([0.0, 0.01, 0.03, 0.1, 0.3]) if per_sample else 8 / 255

    def start(seed):
        gen = torch.Generator().manual_seed(seed)
        return gacd_fast.pgd_random_start(x, eps=eps, norm=norm, generator=gen, backend=backend)

    a = start(1234)
    assert a.shape == x.shape and a.dtype == dtype and a.data_ptr() != x.data_ptr()
    assert torch.equal(a, start(1234)) and not torch.equal(a, start(99))
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    delta = (a.double() - x.double()).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    radius = eps.double() if per_sample else torch.full((5,), eps, dtype=torch.float64)
    slack = torch.finfo(dtype).eps * (1 if norm == "linf" else delta.shape[1] ** 0.5)  # rounding x + noise
    assert bool((size <= radius + slack).all()), f"outside the eps-ball: {size} > {radius}"
    if per_sample:
        assert torch.equal(a[0], x[0])
