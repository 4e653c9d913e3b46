"""Triton PGD step and random start, what only this backend has: several programs, determinism, the
fused Philox start, opcheck, torch.compile (CPU interpreter here; CUDA when present). Values on every
backend are in tests/test_conformance.py."""
from __future__ import annotations

import os

import pytest
import torch

import gacd_fast
import oracles
from gacd_fast.ops import triton_backend as TB
from inputs import pgd_images
from tolerances import assert_close

# CPU tensors need the interpreter; on a GPU machine run with TRITON_INTERPRET=0 to test CUDA.
DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else (["cuda"] if torch.cuda.is_available() else [])
pytestmark = [pytest.mark.parametrize("device", DEVICES)] + ([pytest.mark.interpreter] if DEVICES == ["cpu"] else [])

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_several_programs(device, norm):
    """More elements than one program's block, and samples longer than one row block (65536 under
    the interpreter): bitwise (linf) / float64 (l2) step."""
    x_adv, grad, x_nat = pgd_images((2, 3, 160, 160), zero_grad_sample=True, device=device)
    got = TB.pgd_step_(x_adv.clone(), grad, x_nat, 0.01, 0.03, 0.0, 1.0, norm)
    if norm == "linf":
        assert torch.equal(got, oracles.pgd_linf_step(x_adv, grad, x_nat, 0.01, 0.03, 0.0, 1.0))
    else:
        assert_close(got, oracles.pgd_l2_step(x_adv, grad, x_nat, 0.01, 0.03, 0.0, 1.0), torch.float32, "l2 step")


def test_deterministic(device):
    x_adv, grad, x_nat = pgd_images((17, 3, 16, 16), device=device)
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
    x_adv, grad, x_nat = pgd_images((3, 2, 5), device=device)
    for norm in ("linf", "l2"):
        torch.library.opcheck(torch.ops.gacd_triton.pgd_step_.default,
                              (x_adv.clone(), grad, x_nat, None, 0.01, None, 0.03, 0.0, 1.0, norm))
    per = torch.rand(3, device=device)
    torch.library.opcheck(torch.ops.gacd_triton.pgd_step_.default,
                          (x_adv.clone(), grad, x_nat, per, 0.0, per, 0.0, 0.0, 1.0, "linf"))
    torch.library.opcheck(torch.ops.gacd_triton.pgd_random_start_linf.default, (x_nat, None, 0.1, 3))


def test_compile_fullgraph(device):
    x_adv, grad, x_nat = pgd_images((5, 3, 8, 8), device=device)
    eps = torch.rand(5, device=device) * 0.1

    def step(x, g, n, e):
        return gacd_fast.pgd_step_(x, g, n, alpha=0.01, eps=e, backend="triton")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    want = oracles.pgd_linf_step(x_adv, grad, x_nat, 0.01, eps, 0.0, 1.0)
    got = x_adv.clone()
    compiled(got, grad, x_nat, eps)
    assert torch.equal(got, want)
