"""pytest-benchmark micro-benchmarks of the CPU paths (not part of `make test`):

    .venv/bin/python -m pytest benchmarks/ --benchmark-only
"""
import pytest
import torch

import gacd_fast
from gacd_fast.functional import weighted_reduce
from gacd_fast.ops import reference

B, K, D = 128, 16384, 128


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(0)
    q = torch.randn(B, D, requires_grad=True)
    p = torch.randn(B, D, requires_grad=True)
    return q, p, torch.randn(K, D), torch.rand(B)


def _full(fn, q, p, n, w):
    return torch.autograd.grad(fn(q, p, n, w), [q, p])


@pytest.mark.parametrize("backend", ["torch", "cext"])
def test_info_nce_backend(benchmark, inputs, backend):
    if gacd_fast.backends.unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} unavailable")
    benchmark(_full, lambda q, p, n, w: gacd_fast.info_nce(q, p, n, weights=w, backend=backend), *inputs)


def test_info_nce_eager_reference(benchmark, inputs):
    benchmark(_full, lambda q, p, n, w: weighted_reduce(reference.info_nce_rows(q, p, n, None, 0.07, True), w, "mean"), *inputs)


@pytest.mark.parametrize("backend", ["torch", "cext"])
def test_pgd_step(benchmark, backend):
    if gacd_fast.backends.unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} unavailable")
    x = torch.rand(128, 3, 32, 32)
    adv, g = x.clone(), torch.randn_like(x)
    benchmark(gacd_fast.pgd_step_, adv, g, x, alpha=2 / 255, eps=8 / 255, backend=backend)
