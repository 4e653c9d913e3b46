"""torch.compile(fullgraph=True) over the public API: no graph break, same results as eager."""
import pytest
import torch

import gacd_fast
from gacd_fast import GACDLoss
from tolerances import assert_close


@pytest.mark.slow
def test_info_nce_and_pgd_step_compile_fullgraph():
    q = torch.randn(8, 16, requires_grad=True)
    p, n, w = torch.randn(8, 16), torch.randn(100, 16), torch.rand(8)
    idx = torch.randint(100, (8, 9))
    fn = torch.compile(lambda q, p, n: gacd_fast.info_nce(q, p, n, weights=w, neg_index=idx), fullgraph=True)
    got = fn(q, p, n)
    (g_got,) = torch.autograd.grad(got, [q])
    want = gacd_fast.info_nce(q, p, n, weights=w, neg_index=idx)
    (g_want,) = torch.autograd.grad(want, [q])
    assert_close(got, want, torch.float32, "loss")
    assert_close(g_got, g_want, torch.float32, "grad")

    x = torch.rand(4, 3, 8, 8)
    g = torch.randn_like(x)
    adv = x.clone()
    step = torch.compile(lambda a, g, x: gacd_fast.pgd_step_(a, g, x, alpha=0.1, eps=0.2), fullgraph=True)
    step(adv, g, x)
    assert torch.equal(adv, gacd_fast.pgd_step_(x.clone(), g, x, alpha=0.1, eps=0.2))


@pytest.mark.slow
def test_gacd_loss_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    crit = GACDLoss(16, 12, num_data=50, embed_dim=8, num_negatives=20)
    twin = GACDLoss(16, 12, num_data=50, embed_dim=8, num_negatives=20)
    twin.load_state_dict(crit.state_dict())
    f_s, f_t = torch.randn(8, 16), torch.randn(8, 12)
    idx, contrast = torch.arange(8), torch.randint(50, (8, 21))
    logits, y = torch.randn(8, 3), torch.randint(3, (8,))
    args = (f_s, f_t, idx, contrast)
    kwargs = dict(teacher_logits=logits, targets=y)
    explained = torch._dynamo.explain(crit)(*args, **kwargs)
    assert explained.graph_break_count == 0, explained.break_reasons
    crit.load_state_dict(twin.state_dict())  # explain ran a forward that updated the memory
    compiled = torch.compile(crit, fullgraph=True)
    got = compiled(*args, **kwargs)
    got.backward()
    want = twin(*args, **kwargs)
    want.backward()
    assert_close(got, want, torch.float32, "loss")
    assert_close(crit.embed_s.linear.weight.grad, twin.embed_s.linear.weight.grad, torch.float32, "head grad")
    assert_close(crit.bank_t.rows, twin.bank_t.rows, torch.float32, "memory after update")
