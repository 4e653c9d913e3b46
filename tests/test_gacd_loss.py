"""GACDLoss: the contrastive term, memories, weights, CRD call form, state, and that it trains."""
import io
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import gacd_fast
from gacd_fast import FeatureQueue, GACDLoss, MemoryBank, teacher_weights
from gacd_fast.ops import reference
from tolerances import assert_close


def feats(b=6, ds=10, dt=14):
    return torch.randn(b, ds, requires_grad=True), torch.randn(b, dt)


def test_memory_loss_equals_info_nce_on_embeddings():
    crit = GACDLoss(10, 14, num_data=50, embed_dim=8, num_negatives=20, weighting="none")
    f_s, f_t = feats()
    idx = torch.arange(6)
    contrast = torch.randint(50, (6, 21))
    bank_before = crit.bank_t.rows.clone()
    loss = crit(f_s, f_t, idx, contrast)
    s, t = crit.embed_s(f_s), crit.embed_t(f_t)
    want = reference.info_nce_rows(s, t, bank_before, contrast[:, 1:], 0.07, True).mean()
    assert_close(loss, want, torch.float32, "loss")
    loss.backward()
    assert f_s.grad is not None and crit.embed_s.linear.weight.grad is not None
    assert crit.embed_t.linear.weight.grad is None, "teacher_head='frozen' (the default) takes no gradient"
    trained = GACDLoss(10, 14, num_data=50, embed_dim=8, num_negatives=20, weighting="none", teacher_head="train")
    trained(f_s, f_t, idx, contrast).backward()
    assert trained.embed_t.linear.weight.grad is not None


def test_memory_update_momentum_and_only_when_training():
    crit = GACDLoss(10, 14, num_data=50, embed_dim=8, num_negatives=5, weighting="none", momentum=0.5)
    f_s, f_t = feats()
    idx = torch.tensor([3, 7, 9, 11, 20, 49])
    before = crit.bank_t.rows.clone()
    crit.eval()
    crit(f_s, f_t, idx)
    assert torch.equal(crit.bank_t.rows, before), "eval mode must not touch the memory"
    crit.train()
    crit(f_s, f_t, idx)
    t = crit.embed_t(f_t).detach()
    want = F.normalize(0.5 * before[idx] + 0.5 * t, dim=1)
    assert_close(crit.bank_t.rows[idx], want, torch.float32, "updated rows")
    others = torch.ones(50, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(crit.bank_t.rows[others], before[others])
    crit(f_s, f_t, idx, update_bank=False)  # e.g. inside an attack
    assert_close(crit.bank_t.rows[idx], want, torch.float32, "unchanged with update_bank=False")


def test_sampled_negatives_never_include_own_row():
    bank = MemoryBank(5, 4)
    idx = torch.tensor([0, 1, 2, 3, 4, 4, 0])
    neg = bank.sample_negatives(idx, 2000)
    assert neg.shape == (7, 2000)
    assert (neg != idx[:, None]).all() and neg.min() >= 0 and neg.max() <= 4
    # uniform over the other rows
    counts = torch.bincount(neg[0], minlength=5)[1:].float()
    assert counts.min() > 400


def test_queue_is_fifo_in_order():
    q = FeatureQueue(5, 2)
    vals = torch.arange(14, dtype=torch.float32).view(7, 2)
    q.enqueue(vals[:3])
    assert torch.equal(q.rows[:3], vals[:3]) and int(q.ptr) == 3
    q.enqueue(vals[3:6])  # wraps: rows 3, 4 then 0
    assert torch.equal(q.rows[3:5], vals[3:5]) and torch.equal(q.rows[0], vals[5]) and int(q.ptr) == 1
    q.enqueue(torch.arange(20, dtype=torch.float32).view(10, 2))  # longer than the queue: last 5 kept
    assert sorted(q.rows[:, 0].tolist()) == [10.0, 12.0, 14.0, 16.0, 18.0]


def test_queue_mode_uses_whole_queue_then_enqueues_teacher():
    crit = GACDLoss(10, 14, embed_dim=8, num_negatives=16, bank="queue", weighting="none")
    f_s, f_t = feats()
    before = crit.bank_t.rows.clone()
    loss = crit(f_s, f_t)
    s, t = crit.embed_s(f_s), crit.embed_t(f_t)
    assert_close(loss, reference.info_nce_rows(s, t, before, None, 0.07, True).mean(), torch.float32, "loss")
    assert_close(crit.bank_t.rows[:6], t, torch.float32, "enqueued teacher embeddings")
    loss.backward()  # the enqueue after forward must not break backward


@pytest.mark.parametrize("mode", ["confidence", "correct", "none"])
def test_teacher_weights(mode):
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 5.0]])
    y = torch.tensor([0, 0, 2])
    w = teacher_weights(logits, y, mode)
    want = {
        "confidence": logits.softmax(1)[torch.arange(3), y],
        "correct": torch.tensor([1.0, 0.0, 1.0]),
        "none": torch.ones(3),
    }[mode]
    assert_close(w, want, torch.float32, mode)


def test_weighting_applied_in_loss():
    crit = GACDLoss(10, 14, num_data=40, embed_dim=8, num_negatives=12, weighting="correct", reduction="none")
    crit.eval()
    f_s, f_t = feats(4)
    idx, contrast = torch.arange(4), torch.randint(40, (4, 13))
    logits, y = torch.randn(4, 3), torch.randint(3, (4,))
    per = crit(f_s, f_t, idx, contrast, teacher_logits=logits, targets=y)
    raw = crit(f_s, f_t, idx, contrast, weights=torch.ones(4))
    correct = (logits.argmax(1) == y).float()
    assert_close(per, raw * correct, torch.float32, "weighted rows")
    with pytest.raises(ValueError, match="teacher_logits"):
        crit(f_s, f_t, idx, contrast)


def test_symmetric_and_nce_critic():
    crit = GACDLoss(10, 14, num_data=30, embed_dim=8, num_negatives=9, weighting="none", symmetric=True, critic="nce")
    crit.eval()
    f_s, f_t = feats(5)
    idx, contrast = torch.arange(5), torch.randint(30, (5, 10))
    loss = crit(f_s, f_t, idx, contrast)
    s, t = crit.embed_s(f_s), crit.embed_t(f_t)
    neg = contrast[:, 1:]
    want = (reference.nce_rows(s, t, crit.bank_t.rows, neg, 0.07, True, 30).mean()
            + reference.nce_rows(t, s, crit.bank_s.rows, neg, 0.07, True, 30).mean())
    assert_close(loss, want, torch.float32, "symmetric nce")
    crit.train()
    before_s = crit.bank_s.rows.clone()
    crit(f_s, f_t, idx, contrast)
    assert not torch.equal(crit.bank_s.rows[idx], before_s[idx])


def test_crd_drop_in_from_opt_and_flattening():
    opt = SimpleNamespace(s_dim=2 * 3 * 3, t_dim=14, feat_dim=8, nce_k=7, nce_t=0.1, nce_m=0.5, n_data=25)
    crit = GACDLoss.from_crd_opt(opt)  # CRD's configuration: weighting="none", no teacher logits needed
    # tau as CRD holds it: float32 (tests/test_crd_equality.py)
    assert crit.temperature == float(torch.tensor(0.1)) and crit.num_negatives == 7 and crit.critic == "crd_nce"
    f_s = torch.randn(4, 2, 3, 3, requires_grad=True)  # CRD's Embed flattens
    loss = crit(f_s, torch.randn(4, 14), torch.tensor([1, 2, 3, 4]), torch.randint(25, (4, 8)))
    loss.backward()
    assert loss.dim() == 0 and f_s.grad.shape == f_s.shape


def test_state_dict_round_trip():
    crit = GACDLoss(10, 14, embed_dim=8, num_negatives=16, bank="queue", weighting="none", symmetric=True)
    crit(*feats())
    buf = io.BytesIO()
    torch.save(crit.state_dict(), buf)
    other = GACDLoss(10, 14, embed_dim=8, num_negatives=16, bank="queue", weighting="none", symmetric=True)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for (k, a), (_, b) in zip(crit.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    assert {"bank_t.rows", "bank_t.ptr", "bank_s.rows"} <= set(crit.state_dict())


def test_autocast_half_embeddings_work():
    crit = GACDLoss(10, 14, embed_dim=8, num_negatives=16, bank="queue", weighting="none")
    f_s, f_t = feats()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crit(f_s, f_t)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bank="ring"), ValueError, "bank"),
    (dict(weighting="soft"), ValueError, "weighting"),
    (dict(critic="dot"), ValueError, "critic"),
    (dict(critic="crd_nce", bank="batch"), ValueError, "bank='memory'"),
    (dict(distributed=1), TypeError, "distributed"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(num_negatives=0), ValueError, "num_negatives"),
    (dict(embed_dim=2.5), TypeError, "embed_dim"),
    (dict(num_data=None), ValueError, "num_data"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(reduction="avg"), ValueError, "reduction"),
])
def test_constructor_errors(kwargs, exc, match):
    args = dict(num_data=20)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        GACDLoss(10, 14, **args)


def test_forward_errors():
    crit = GACDLoss(10, 14, num_data=20, embed_dim=8, num_negatives=5, weighting="none")
    f_s, f_t = feats(4)
    idx = torch.arange(4)
    with pytest.raises(ValueError, match="index"):
        crit(f_s, f_t)
    with pytest.raises(IndexError, match="index"):
        crit(f_s, f_t, torch.tensor([0, 1, 2, 20]))
    with pytest.raises(TypeError, match="index"):
        crit(f_s, f_t, idx.float())
    with pytest.raises(ValueError, match="batch size"):
        crit(f_s, f_t[:3], idx)
    with pytest.raises(ValueError, match="contrast_index"):
        crit(f_s, f_t, idx, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(IndexError, match="contrast_index"):
        crit(f_s, f_t, idx, torch.full((4, 3), 99))
    with pytest.raises(RuntimeError):  # wrong feature width: the head's linear layer says so
        crit(torch.randn(4, 11), f_t, idx)
    crit_w = GACDLoss(10, 14, num_data=20, embed_dim=8, num_negatives=5)
    with pytest.raises(IndexError, match="targets"):
        crit_w(f_s, f_t, idx, teacher_logits=torch.randn(4, 3), targets=torch.tensor([0, 1, 2, 3]))
