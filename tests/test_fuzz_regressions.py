"""Counterexamples found by the property tests' exploring profile (`make fuzz`), each kept here as an
explicit case on every backend, values and gradients against the float64 oracle. A new
counterexample gets a test here, named after what it exercises, before its fix lands."""
from __future__ import annotations

import pytest
import torch

import gacd_fast
from checks import backend_params, check_info_nce

BACKENDS = backend_params(gacd_fast.available_backends("cpu"))

# issue 18: a positive that dominates every negative by ~1e30 (normalize=False). Triton's online
# log-sum-exp rescaled an empty partial (running max -inf) by 2^(-new max), which overflows once
# the first chunk's max is below -128: 0 * inf = NaN. The backward then recomputed s_pos apart from
# the forward's lse, off by more than one unit at 1e30, so d/d query was -p/tau instead of 0.
HUGE_Q = torch.tensor([[8.6876e29]])
HUGE_P = torch.tensor([[0.3923]])
HUGE_N = torch.tensor([[0.6614], [0.2669], [0.0617], [0.6213], [-0.4519], [-0.1661]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("row", [4, 5, 0])
def test_dominant_positive_gathered(backend, row):
    check_info_nce(backend, HUGE_Q, HUGE_P, HUGE_N, torch.tensor([[row]]), temperature=0.07, normalize=False,
                   reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["shared", "indexed"])
def test_dominant_positive_every_negative_far_below(backend, mode):
    """Every negative below the positive by ~1e31, over several split-K chunks on Triton."""
    q = torch.tensor([[8.6876e29, 0.0], [1.0, 2.0]])
    p = torch.tensor([[0.3923, 0.0], [0.5, 0.25]])
    n = -(torch.rand(40, 2, generator=torch.Generator().manual_seed(3)) + 0.1)
    idx = torch.tensor([[1, 2, 3], [0, 39, 7]]) if mode == "indexed" else None
    if backend == "triton":
        from gacd_fast.kernels import info_nce as kernel
        kernel.config.num_splits = 3
        try:
            check_info_nce(backend, q, p, n, idx, temperature=0.07, normalize=False, reduction="none")
        finally:
            kernel.config.num_splits = None
    else:
        check_info_nce(backend, q, p, n, idx, temperature=0.07, normalize=False, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_logits_near_1e30_agree_to_a_unit_of_the_logits(backend, dtype):
    """tau = 1e-30 (allowed: 1/tau is finite in float32) puts every logit at ~2.4e30, where one unit
    of the accumulation dtype is ~1e23 (float32): the loss log 2 is known only to that absolute
    accuracy, on any backend (cext gave 1.5e23, the reference 0). The property tests now allow a
    few units of the largest |logit| (oracles.logit_scale); this pins the case."""
    x = torch.tensor([[1.5410]], dtype=dtype)
    got = gacd_fast.info_nce(x, x, x, temperature=1e-30, normalize=False, reduction="none", backend=backend)
    unit = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    assert torch.isfinite(got).all()
    assert float((got.double() - 0.6931471805599453).abs()) <= 16 * unit * 1.5410 ** 2 * 1e30
