"""torch.compile(fullgraph=True) over the public API with the Triton backend: no graph break."""
from __future__ import annotations

import os

import pytest
import torch

import gacd_fast

DEVICES = ["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else (["cuda"] if torch.cuda.is_available() else [])
pytestmark = [pytest.mark.parametrize("device", DEVICES)] + ([pytest.mark.interpreter] if DEVICES == ["cpu"] else [])


@pytest.mark.slow
@pytest.mark.parametrize("M", [None, 6])
def test_info_nce_fullgraph(device, M):
    B, K, D = 7, 40, 24
    q, p, n = torch.randn(B, D, device=device), torch.randn(B, D, device=device), torch.randn(K, D, device=device)
    idx = None if M is None else torch.randint(0, K, (B, M), device=device)
    w = torch.rand(B, device=device)

    def f(q, p, n, w, idx):
        return gacd_fast.info_nce(q, p, n, weights=w, neg_index=idx, backend="triton")

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(q, p, n, w, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    runs = []
    for fn in (compiled, f):
        ts = [t.clone().requires_grad_() for t in (q, p, n)]
        out = fn(*ts, w, idx)
        out.backward()
        runs.append([out] + [t.grad for t in ts])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_info_nce_inductor(device):
    # Inductor compiles the weighting/reduction around the opaque custom op (C++ codegen on CPU)
    q, p, n = torch.randn(5, 16, device=device), torch.randn(5, 16, device=device), torch.randn(33, 16, device=device)

    def f(q, p, n):
        return gacd_fast.info_nce(q, p, n, reduction="sum", backend="triton")

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, p, n)
    torch.testing.assert_close(got, f(q, p, n))


@pytest.mark.slow
@pytest.mark.parametrize("bank", ["memory", "queue"])
def test_gacd_loss_and_pgd_step_fullgraph(device, bank):
    """The whole GACDLoss forward (heads, weights, Triton InfoNCE, memory update) and a PGD step
    trace into one graph each; results equal eager."""
    torch.manual_seed(0)
    crit = gacd_fast.GACDLoss(12, 10, num_data=30, embed_dim=16, num_negatives=20, bank=bank, backend="triton").to(device)
    f_s, f_t = torch.randn(6, 12, device=device), torch.randn(6, 10, device=device)
    idx, logits, y = torch.arange(6, device=device), torch.randn(6, 3, device=device), torch.randint(3, (6,), device=device)
    contrast = torch.randint(30, (6, 21), device=device)  # fixed negatives, so both calls see the same
    kwargs = dict(teacher_logits=logits, targets=y, update_bank=False)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(crit)(f_s, f_t, idx, contrast, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    got = torch.compile(crit, fullgraph=True, backend="aot_eager")(f_s, f_t, idx, contrast, **kwargs)
    torch.testing.assert_close(got, crit(f_s, f_t, idx, contrast, **kwargs))

    x = torch.rand(3, 2, 4, 4, device=device)
    g = torch.randn_like(x)

    def step(a, g, x):
        return gacd_fast.pgd_step_(a, g, x, alpha=0.01, eps=0.03, backend="triton")

    torch._dynamo.reset()
    assert torch._dynamo.explain(step)(x.clone(), g, x).graph_break_count == 0
    a = x.clone()
    torch.compile(step, fullgraph=True, backend="aot_eager")(a, g, x)
    assert torch.equal(a, step(x.clone(), g, x))
