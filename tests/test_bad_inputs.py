"""Regression tests for issue 11: what each public op does with bad or extreme input, on every
backend that can run here (torch, cext, and triton under the interpreter)."""
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gacd_fast
from gacd_fast import backends
from gacd_fast.ops import reference

from checks import backend_params

BACKENDS = gacd_fast.available_backends("cpu")


@pytest.fixture(params=backend_params(BACKENDS))
def backend(request):
    return request.param


def _bank(k=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, d, generator=g), torch.randn(3, d, generator=g), torch.randn(k, d, generator=g)


# ----------------------------------------------------------------------------------- row 1: D = 0
@pytest.mark.parametrize("shape", [(4, 0), (0, 4)])
def test_empty_rows_are_a_value_error(backend, shape):
    x = torch.randn(*shape)
    with pytest.raises(ValueError, match="x must have a non-empty dim"):
        gacd_fast.l2_normalize(x, backend=backend)
    with pytest.raises(ValueError, match="a must have a non-empty dim"):
        gacd_fast.cosine_similarity(x, x, backend=backend)


_RAW_CALLS = """
import torch, gacd_fast.ops.cext_backend as c
c.load()
ops = torch.ops.gacd_fast
e, x = torch.randn(4, 0), torch.randn(4, 3)
calls = [
    lambda: ops.l2_normalize(e), lambda: ops.l2_normalize(torch.randn(0, 3)),
    lambda: ops.l2_normalize_backward(e, e), lambda: ops.l2_normalize_backward(x.long(), x),
    lambda: ops.l2_normalize_backward(x[:2], x),
    lambda: ops.cosine_similarity(e, e), lambda: ops.cosine_similarity_backward(torch.ones(4), e, e),
    lambda: ops.cosine_similarity_backward(torch.ones(3), x, x),
    lambda: ops.info_nce_forward(e, e, e, None, 0.1, True, False),
    lambda: ops.info_nce_forward(x, x, x, None, 1e-300, True, False),
    lambda: ops.info_nce_forward(x, x, x, torch.full((4, 2), 9), 0.1, True, False),
    lambda: ops.info_nce_backward(torch.ones(4), e, e, None, None, torch.ones(4), None, 0.1, True, True, True, False),
    lambda: ops.info_nce_backward(torch.ones(4).long(), x, x, x, None, torch.ones(4), None, 0.1, True, True, True, False),
    lambda: ops.info_nce_backward(torch.ones(4), x, x, None, None, torch.ones(4), torch.ones(2, 2), 0.1, True, True, False, False),
    lambda: ops.pgd_step_(torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0), None, 0.1, None, float("nan"), 0.0, 1.0, "linf"),
    lambda: ops.pgd_step_(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 3), None, 0.1, None, 0.1, 0.0, 1.0, "l2"),
]
for call in calls:
    try:
        call()
        print("accepted")
    except (RuntimeError, IndexError) as exc:  # TORCH_CHECK / TORCH_CHECK_INDEX
        print("refused", str(exc).splitlines()[0][:80])
"""


@pytest.mark.slow
@pytest.mark.skipif("cext" not in BACKENDS, reason="the C++ extension cannot be built here")
def test_cpp_entry_points_validate_on_their_own():
    """Calling torch.ops.gacd_fast.* directly with bad shapes never kills the process: each is a
    RuntimeError (IndexError for an index) from TORCH_CHECK (run in a child, so a crash would show as a signal)."""
    proc = subprocess.run([sys.executable, "-c", _RAW_CALLS], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child died ({proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 16 and all(line.startswith("refused") for line in lines), proc.stdout


# ------------------------------------------------------------------------- row 2: PGD on any backend
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_pgd_with_random_start_runs_on_every_backend(backend, monkeypatch):
    torch.manual_seed(0)
    model = _Net()
    x, y = torch.rand(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    out = gacd_fast.PGD(model, eps=0.1, alpha=0.05, steps=2, backend=backend)(x, y)
    assert (out - x).abs().max() <= 0.1 + 1e-6
    gacd_fast.set_backend(backend)
    assert gacd_fast.PGD(model, steps=1)(x, y).shape == x.shape
    gacd_fast.set_backend(None)
    monkeypatch.setenv(backends.ENV_VAR, backend)
    assert gacd_fast.pgd_random_start(x, eps=0.1).shape == x.shape


@pytest.mark.skipif("cext" not in BACKENDS, reason="the C++ extension cannot be built here")
def test_cext_random_start_is_the_torch_start():
    x = torch.rand(3, 5)
    a = gacd_fast.pgd_random_start(x, eps=0.2, generator=torch.Generator().manual_seed(3), backend="cext")
    b = gacd_fast.pgd_random_start(x, eps=0.2, generator=torch.Generator().manual_seed(3), backend="torch")
    assert torch.equal(a, b)


# ----------------------------------------------------------------- row 3: second-order gradients
def test_second_order_through_info_nce_is_right_or_refused(backend):
    q, p, n = (t.double() for t in _bank())
    q.requires_grad_(True)
    # the bank needs no grad: the lean paths keep no bank, so create_graph must be refused
    loss = gacd_fast.info_nce(q, p, n, backend=backend)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        torch.autograd.grad(loss, q, create_graph=True)
    # first order still works, and the torch backend with a bank that requires grad is exact
    (g,) = torch.autograd.grad(gacd_fast.info_nce(q, p, n, backend=backend), q)
    assert torch.isfinite(g).all()


def test_torch_second_order_with_negatives_requiring_grad_matches_reference():
    q, p, n = (t.double().requires_grad_(True) for t in _bank())

    def f(backend_fn):
        def loss(q_, p_, n_):
            return backend_fn(q_, p_, n_, None, 0.5, True).sum()
        return loss

    from gacd_fast.ops import chunked
    assert torch.autograd.gradgradcheck(f(chunked.info_nce_rows), (q, p, n))


@pytest.mark.skipif("cext" not in BACKENDS, reason="the C++ extension cannot be built here")
@pytest.mark.parametrize("op", ["normalize", "cosine_similarity"])
def test_cext_similarity_second_order_refused(op):
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = gacd_fast.l2_normalize(a, backend="cext") if op == "normalize" else gacd_fast.cosine_similarity(a, a, backend="cext")
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(out.sum(), a, create_graph=True)


# ----------------------------------------------------------------------- row 4: negative weights
def test_negative_weights_rejected(backend):
    q, p, n = _bank()
    with pytest.raises(ValueError, match="weights must be >= 0"):
        gacd_fast.info_nce(q, p, n, weights=torch.tensor([1.0, -0.999999, 1.0]), backend=backend)
    gacd_fast.set_value_checks(False)  # the documented opt-out: used as given
    gacd_fast.info_nce(q, p, n, weights=torch.tensor([1.0, -0.5, 1.0]), backend=backend)


# ------------------------------------------------------------------------- row 6: NaN per-sample eps
@pytest.mark.parametrize("name", ["eps", "alpha"])
def test_nan_per_sample_values_rejected(backend, name):
    x = torch.rand(3, 4)
    bad = torch.tensor([0.1, float("nan"), 0.1])
    kwargs = dict(alpha=0.1, eps=0.1)
    kwargs[name] = bad
    with pytest.raises(ValueError, match=f"{name} must be finite for every sample"):
        gacd_fast.pgd_step_(x.clone(), x, x, backend=backend, **kwargs)
    if name == "eps":
        with pytest.raises(ValueError, match="eps must be finite"):
            gacd_fast.pgd_random_start(x, eps=bad, backend=backend)


# --------------------------------------------------------------------------- row 7: huge rows
@pytest.mark.parametrize("scale", [1e19, 1e30, 1e37])
def test_huge_rows_normalise_like_any_other(backend, scale):
    q, p, n = _bank()
    want = gacd_fast.info_nce(q, p, n, reduction="none", backend="torch")
    big = n.clone()
    big[2] *= scale
    q_big = q * scale
    got = gacd_fast.info_nce(q_big, p, big, reduction="none", backend=backend)
    ref = reference.info_nce_rows(q_big, p, big, None, 0.07, True)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gacd_fast.l2_normalize(q_big, backend=backend), reference.l2_normalize(q), rtol=1e-5, atol=1e-6)
    idx = torch.tensor([[2, 0], [1, 2], [2, 2]])
    got_i = gacd_fast.info_nce(q_big, p, big, neg_index=idx, reduction="none", backend=backend)
    torch.testing.assert_close(got_i, reference.info_nce_rows(q, p, n, idx, 0.07, True), rtol=1e-4, atol=1e-4)


def test_huge_rows_gradient_is_not_zero():
    q, p, n = _bank()
    q = (q * 1e19).requires_grad_(True)
    gacd_fast.info_nce(q, p, n, backend="torch").backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- row 8: NaN grad
def test_nan_grad_takes_no_step(backend):
    x_nat = torch.full((2, 4), 0.5)
    grad = torch.tensor([[1.0, float("nan"), -1.0, 0.0], [float("nan")] * 4])
    linf = gacd_fast.pgd_step_(x_nat.clone(), grad, x_nat, alpha=0.1, eps=0.2, backend=backend)
    assert torch.equal(linf, torch.tensor([[0.6, 0.5, 0.4, 0.5], [0.5] * 4]))
    l2 = gacd_fast.pgd_step_(x_nat.clone(), grad, x_nat, alpha=0.1, eps=0.2, norm="l2", backend=backend)
    r = 0.1 / math.sqrt(2)
    torch.testing.assert_close(l2, torch.tensor([[0.5 + r, 0.5, 0.5 - r, 0.5], [0.5] * 4]))


def test_l2_huge_and_inf_grads(backend):
    x_nat = torch.full((3, 4), 0.5)
    grad = torch.tensor([[3e30, 4e30, 0.0, 0.0], [float("inf"), 1.0, float("-inf"), 0.0], [3.0, 4.0, 0.0, 0.0]])
    out = gacd_fast.pgd_step_(x_nat.clone(), grad, x_nat, alpha=0.5, eps=1.0, norm="l2", backend=backend)
    r = 0.5 / math.sqrt(2)
    want = torch.tensor([[0.8, 0.9, 0.5, 0.5], [0.5 + r, 0.5, 0.5 - r, 0.5], [0.8, 0.9, 0.5, 0.5]])
    torch.testing.assert_close(out, want)


def test_nan_images_propagate_through_the_step(backend):
    x = torch.tensor([[float("nan"), 0.5]])
    out = gacd_fast.pgd_step_(x.clone(), torch.ones(1, 2), torch.full((1, 2), 0.5), alpha=0.1, eps=0.2, backend=backend)
    assert math.isnan(out[0, 0]) and out[0, 1] == pytest.approx(0.6)


# ---------------------------------------------------------------- row 9: inf logits, tiny temperature
def test_temperature_with_infinite_reciprocal_rejected(backend):
    q, p, n = _bank()
    with pytest.raises(ValueError, match="temperature must be >= .* got 1e-300"):
        gacd_fast.info_nce(q, p, n, temperature=1e-300, backend=backend)


def test_infinite_logits_follow_logsumexp(backend):
    q, p, n = _bank()
    n[1, 0] = float("inf")  # row i scores +inf or -inf against it, by the sign of q[i, 0]
    got = gacd_fast.info_nce(q, p, n, normalize=False, reduction="none", backend=backend)
    want = reference.info_nce_rows(q, p, n, None, 0.07, False)
    assert torch.equal(torch.isinf(got), torch.isinf(want)) and torch.equal(torch.isnan(got), torch.isnan(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=1e-4, atol=1e-4)
    idx = torch.tensor([[1, 0], [1, 1], [2, 3]])
    got_i = gacd_fast.info_nce(q, p, n, neg_index=idx, normalize=False, reduction="none", backend=backend)
    want_i = reference.info_nce_rows(q, p, n, idx, 0.07, False)
    assert torch.equal(torch.isinf(got_i), torch.isinf(want_i)) and torch.equal(torch.isnan(got_i), torch.isnan(want_i))


# ------------------------------------------------------------------- row 10: tensors requiring grad
@pytest.mark.parametrize("name", ["grad", "x_nat", "alpha", "eps"])
def test_pgd_step_arguments_requiring_grad_rejected(backend, name):
    args = dict(x_adv=torch.rand(2, 3), grad=torch.randn(2, 3), x_nat=torch.rand(2, 3),
                alpha=torch.full((2,), 0.1), eps=torch.full((2,), 0.2))
    args[name] = args[name].requires_grad_(True)
    with pytest.raises(ValueError, match=f"{name} must not require grad"):
        gacd_fast.pgd_step_(**args, backend=backend)


# ------------------------------------------------------------------------ row 12: lists for tensors
@pytest.mark.parametrize("name", ["weights", "neg_index"])
def test_lists_for_tensors_are_a_type_error(name):
    q, p, n = _bank()
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor, got list"):
        gacd_fast.info_nce(q, p, n, **{name: [1, 1, 1]})


def test_same_device_check_names_non_tensors():
    from gacd_fast._checks import check_same_device
    with pytest.raises(TypeError, match="index must be a torch.Tensor, got list"):
        check_same_device(f_s=torch.zeros(1), index=[0])


# ----------------------------------------------------------------------------- row 13: meta tensors
def test_meta_tensors_skip_value_checks():
    q, p, n = (torch.empty(3, 4, device="meta") for _ in range(3))
    idx = torch.zeros(3, 2, dtype=torch.long, device="meta")
    w = torch.ones(3, device="meta")
    out = gacd_fast.info_nce(q, p, n, neg_index=idx, weights=w, backend="torch")
    assert out.device.type == "meta" and out.shape == ()
    x = torch.empty(2, 3, device="meta")
    e = torch.full((2,), 0.1, device="meta")
    gacd_fast.pgd_step_(x, x.clone(), x.clone(), alpha=e, eps=e, backend="torch")
    model = _Net().to("meta")
    adv = gacd_fast.PGD(model, eps=0.1, alpha=0.05, steps=1, backend="torch")(
        torch.empty(2, 3, 2, 2, device="meta"), torch.zeros(2, dtype=torch.long, device="meta"))
    assert adv.device.type == "meta"


# ---------------------------------------------------------------------------------- row 15: PGD
def test_pgd_rejects_nan_images():
    x = torch.rand(2, 3, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images must not contain NaN"):
        gacd_fast.PGD(_Net())(x, torch.tensor([0, 1]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_pgd_accepts_any_integer_targets(dtype):
    x = torch.rand(2, 3, 2, 2)
    torch.manual_seed(1)
    a = gacd_fast.PGD(_Net(), steps=1, random_start=False)(x, torch.tensor([0, 1], dtype=dtype))
    torch.manual_seed(1)
    b = gacd_fast.PGD(_Net(), steps=1, random_start=False)(x, torch.tensor([0, 1]))
    assert torch.equal(a, b)


def test_pgd_rejects_bool_targets_and_mismatched_normalization():
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(TypeError, match="targets must hold integer class indices"):
        gacd_fast.PGD(_Net())(torch.rand(2, 3, 2, 2), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="normalization has 3 channels but images"):
        gacd_fast.PGD(nn.Flatten(), normalization=((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))(x, torch.tensor([0, 1]))


def test_pgd_under_inference_mode_is_a_clear_error_and_inference_images_work():
    x, y = torch.rand(2, 3, 2, 2), torch.tensor([0, 1])
    atk = gacd_fast.PGD(_Net(), steps=1)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="outside torch.inference_mode"):
            atk(x, y)
        x_inf = torch.rand(2, 3, 2, 2)
    assert atk(x_inf, y).shape == x.shape


@pytest.mark.parametrize("loss,exc,match", [
    (lambda out, y: 1.0, TypeError, "loss must return a scalar tensor .*got float"),
    (lambda out, y: out.sum(1), TypeError, r"loss must return a scalar tensor .*got \(2,\)"),
    (lambda out, y: torch.tensor(1.0), ValueError, "loss must depend on the model's output"),
])
def test_pgd_bad_loss_results(loss, exc, match):
    with pytest.raises(exc, match=match):
        gacd_fast.PGD(_Net(), steps=1, loss=loss)(torch.rand(2, 3, 2, 2), torch.tensor([0, 1]))


# -------------------------------------------------------------------- row 16: the value-check opt-out
def test_set_value_checks_documents_out_of_range_indices():
    doc = gacd_fast.set_value_checks.__doc__
    assert "out-of-range" in doc and "triton" in doc and "CUDA" in doc
    assert "set_value_checks" in gacd_fast.info_nce.__doc__


# ---------------------------------------------------------------------------- row 17: numpy scalars
def test_numpy_scalars_accepted(backend):
    q, p, n = _bank()
    a = gacd_fast.info_nce(q, p, n, temperature=np.float32(0.25), backend=backend)
    b = gacd_fast.info_nce(q, p, n, temperature=0.25, backend=backend)
    torch.testing.assert_close(a, b)
    x = torch.rand(2, 3)
    s1 = gacd_fast.pgd_step_(x.clone(), x - 0.5, x, alpha=np.float64(0.1), eps=np.float32(0.2), backend=backend)
    s2 = gacd_fast.pgd_step_(x.clone(), x - 0.5, x, alpha=0.1, eps=float(np.float32(0.2)), backend=backend)
    assert torch.equal(s1, s2)
    assert gacd_fast.nce_loss(q, p, n, num_data=np.int64(100)).isfinite()
    with pytest.raises(TypeError, match="temperature must be a real number, got bool"):
        gacd_fast.info_nce(q, p, n, temperature=np.bool_(True))
