"""Triton PGD step and random start against the reference (CPU interpreter here; CUDA when present)."""
from __future__ import annotations

import os

import pytest
import torch

import gacd_fast
from gacd_fast.ops import reference as R
from gacd_fast.ops import triton_backend as TB
from tolerances import assert_close

from gacd_fast.kernels import pgd as KP

# CPU tensors need the interpreter; on a GPU machine run with TRITON_INTERPRET=0 to test CUDA.
DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.parametrize("device", DEVICES)

SHAPES = [(1, 1), (3, 3, 5, 7), (17, 3, 16, 16), (64, 3, 32, 32)]


def _images(shape, dtype, device, zero_grad_sample=False):
    x_nat = torch.rand(shape, device=device).to(dtype)
    x_adv = torch.clamp(x_nat + (torch.rand(shape, device=device) - 0.5) * 0.1, 0, 1).to(dtype)
    grad = torch.randn(shape, device=device).to(dtype)
    grad.view(-1)[:: 7] = 0  # sign(0) = 0
    if zero_grad_sample:
        grad[0] = 0
    return x_adv, grad, x_nat


def _steps(shape, device, per_sample):
    if per_sample:
        b = shape[0]
        return torch.rand(b, device=device) * 0.05, torch.rand(b, device=device) * 0.1
    return 2 / 255, 8 / 255


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_linf_bitwise(device, shape, per_sample, dtype):
    x_adv, grad, x_nat = _images(shape, dtype, device)
    alpha, eps = _steps(shape, device, per_sample)
    want = R.pgd_step_(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, "linf")
    got = x_adv.clone()
    out = gacd_fast.pgd_step_(got, grad, x_nat, alpha=alpha, eps=eps, backend="triton")
    assert out is got
    assert torch.equal(got, want), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("per_sample", [False, True])
def test_linf_bf16(device, per_sample):
    # The interpreter rounds fp32->bf16 by truncation (a GPU rounds to nearest): allow one bf16 ulp.
    shape = (5, 3, 7, 9)
    x_adv, grad, x_nat = _images(shape, torch.bfloat16, device)
    alpha, eps = _steps(shape, device, per_sample)
    want = R.pgd_step_(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, "linf")
    got = TB.pgd_step_(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, "linf")
    assert (got.float() - want.float()).abs().max() <= 2 ** -8


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_l2_matches_reference(device, shape, per_sample, dtype):
    x_adv, grad, x_nat = _images(shape, dtype, device, zero_grad_sample=True)
    alpha, eps = _steps(shape, device, per_sample)
    want = R.pgd_step_(x_adv.clone(), grad, x_nat, alpha, eps, 0.0, 1.0, "l2")
    got = gacd_fast.pgd_step_(x_adv.clone(), grad, x_nat, alpha=alpha, eps=eps, norm="l2", backend="triton")
    if dtype == torch.float32:
        assert_close(got, want, dtype, "l2 step")
    else:  # rounding of an fp32 intermediate may flip to the neighbouring value: one ulp
        ulp = 2 ** -10 if dtype == torch.float16 else 2 ** -7
        assert (got.float() - want.float()).abs().max() <= ulp


def test_clip_range_and_noncontiguous(device):
    x_nat = torch.rand(6, 4, 5, device=device)
    base = torch.rand(5, 4, 6, device=device).transpose(0, 2)  # non-contiguous [6, 4, 5]
    grad = torch.randn(6, 4, 5, device=device)
    want = R.pgd_step_(base.clone(), grad, x_nat, 0.3, 0.5, 0.2, 0.7, "linf")
    got = base.clone()  # clone keeps the transposed strides
    assert not got.is_contiguous()
    TB.pgd_step_(got, grad, x_nat, 0.3, 0.5, 0.2, 0.7, "linf")
    assert torch.equal(got, want)


def test_float64_falls_back(device):
    x_adv, grad, x_nat = _images((4, 9), torch.float64, device)
    want = R.pgd_step_(x_adv.clone(), grad, x_nat, 0.01, 0.03, 0.0, 1.0, "l2")
    got = TB.pgd_step_(x_adv.clone(), grad, x_nat, 0.01, 0.03, 0.0, 1.0, "l2")
    assert torch.equal(got, want)


def test_deterministic(device):
    x_adv, grad, x_nat = _images((17, 3, 16, 16), torch.float32, device)
    for norm in ("linf", "l2"):
        a = TB.pgd_step_(x_adv.clone(), grad, x_nat, 0.01, 0.03, 0.0, 1.0, norm)
        b = TB.pgd_step_(x_adv.clone(), grad, x_nat, 0.01, 0.03, 0.0, 1.0, norm)
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_start(device, dtype):
    x = torch.rand(64, 3, 16, 16, device=device).to(dtype)
    gen = lambda seed: torch.Generator().manual_seed(seed)  # noqa: E731
    a = TB.pgd_random_start(x, 8 / 255, "linf", gen(1234))
    b = TB.pgd_random_start(x, 8 / 255, "linf", gen(1234))
    c = TB.pgd_random_start(x, 8 / 255, "linf", gen(99))
    assert a.dtype == dtype and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    noise = a.float() - x.float()
    inside = (x.float() > 0.05) & (x.float() < 0.95)  # away from the clamp
    n = noise[inside] / (8 / 255)
    assert float(n.abs().max()) <= 1 + 1e-2
    assert abs(float(n.mean())) < 0.02 and abs(float(n.var()) - 1 / 3) < 0.02  # U(-1, 1)
    eps_t = torch.linspace(0, 0.1, 64, device=device)
    d = TB.pgd_random_start(x, eps_t, "linf", gen(5))
    assert torch.equal(d[0], x[0])  # eps 0: no noise
    assert ((d.float() - x.float()).abs().flatten(1).amax(1) <= eps_t + 1e-3).all()
    l2 = TB.pgd_random_start(x, 0.1, "l2", gen(5))  # not fused: the reference's start
    assert torch.equal(l2, gacd_fast.pgd_random_start(x, eps=0.1, norm="l2", generator=gen(5), backend="torch"))


def test_opcheck(device):
    x_adv, grad, x_nat = _images((3, 2, 5), torch.float32, device)
    for norm in ("linf", "l2"):
        torch.library.opcheck(torch.ops.gacd_triton.pgd_step_.default,
                              (x_adv.clone(), grad, x_nat, None, 0.01, None, 0.03, 0.0, 1.0, norm))
    per = torch.rand(3, device=device)
    torch.library.opcheck(torch.ops.gacd_triton.pgd_step_.default,
                          (x_adv.clone(), grad, x_nat, per, 0.0, per, 0.0, 0.0, 1.0, "linf"))
    torch.library.opcheck(torch.ops.gacd_triton.linf_random_start.default, (x_nat, None, 0.1, 3))


def test_compile_fullgraph(device):
    x_adv, grad, x_nat = _images((5, 3, 8, 8), torch.float32, device)
    eps = torch.rand(5, device=device) * 0.1

    def step(x, g, n, e):
        return gacd_fast.pgd_step_(x, g, n, alpha=0.01, eps=e, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = R.pgd_step_(x_adv.clone(), grad, x_nat, 0.01, eps, 0.0, 1.0, "linf")
    got = x_adv.clone()
    compiled(got, grad, x_nat, eps)
    assert torch.equal(got, want)
