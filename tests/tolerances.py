"""The one table of per-dtype tolerances, and a comparison that says where values differ."""
from __future__ import annotations

import torch

# (atol, rtol) for a value computed from inputs of this dtype, compared with the float64 oracle.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare ``actual`` with ``expected`` (e.g. a float64 oracle) at ``dtype``'s tolerance."""
    atol, rtol = TOLERANCES[dtype]
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol, equal_nan=True)
    if bool(bad.any()):
        idx = bad.nonzero()[:5].tolist()
        diff = (a - e).abs()[bad].max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{a.numel()} mismatches at {dtype} (atol={atol}, rtol={rtol}); "
            f"max abs diff {diff:.3e}; first at {idx}"
        )
