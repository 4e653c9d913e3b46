"""One backend call against the float64 oracle, values and gradients: shared by the conformance
module and the backend-specific tests (split-K, tiles, huge norms, ...)."""
from __future__ import annotations

import pytest
import torch

import gacd_fast
import oracles
from tolerances import assert_close

NCE_NAMES = ("query", "positive", "negatives")


def backend_params(names):
    """``names`` as pytest params; triton's carry the ``interpreter`` marker (CPU tensors run it
    under the Triton interpreter)."""
    return [pytest.param(name, marks=[pytest.mark.interpreter] if name == "triton" else []) for name in names]


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses and cosines: float32, float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def leaves(tensors, need):
    """The tested inputs (``need``: which require grad) and their float64 twins for the oracle."""
    tested = [t.clone().requires_grad_(r) for t, r in zip(tensors, need)]
    twins = [t.detach().double().requires_grad_(r) for t, r in zip(tensors, need)]
    return tested, twins


def assert_grads_close(out, want, tested, twins, dtype, names):
    """Gradients of ``out`` (for a random cotangent) vs the oracle's, each in its input's dtype."""
    cot = torch.rand(out.shape, dtype=torch.float64)
    wrt = [i for i, t in enumerate(tested) if t.requires_grad]
    got = torch.autograd.grad(out, [tested[i] for i in wrt], cot.to(out.device, out.dtype))
    expected = torch.autograd.grad(want, [twins[i] for i in wrt], cot.to(want.device))
    for i, g, e in zip(wrt, got, expected):
        assert g.dtype == dtype, f"d/d {names[i]}: dtype {g.dtype}, input {dtype}"
        assert_close(g, e, dtype, f"d/d {names[i]}")


def check_info_nce(backend, q, p, n, idx, *, need=(True, True, True), temperature=0.07, weights=None,
                   normalize=True, reduction="mean"):
    """``gacd_fast.info_nce`` on ``backend`` vs oracles.info_nce_rows + oracles.weighted_reduce:
    the loss, its dtype, and the gradient of every input in ``need``. Returns the loss."""
    dtype = q.dtype
    tested, twins = leaves((q, p, n), need)
    out = gacd_fast.info_nce(*tested, temperature=temperature, weights=weights, neg_index=idx, normalize=normalize,
                             reduction=reduction, backend=backend)
    want = oracles.weighted_reduce(oracles.info_nce_rows(*twins, idx, temperature, normalize), weights, reduction)
    assert out.dtype == result_dtype(dtype)
    assert_close(out, want, dtype, "info_nce")
    assert_grads_close(out, want, tested, twins, dtype, NCE_NAMES)
    return out
