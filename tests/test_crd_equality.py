"""GACDLoss.from_crd_opt against an independent CRDLoss, written here from CRD's published formula
(RepDistiller's Embed, ContrastMemory and ContrastLoss) in plain torch, with its own memories.

Both modules get the same embedding weights and memories. Over three SGD steps (Z is set on the
first, the memories move by momentum on every one, the teacher head trains) the losses, the
gradients with respect to the features and the heads, and the memories after each step must agree.
"""
import io
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gacd_fast import GACDLoss
from tolerances import assert_close

OPT = SimpleNamespace(s_dim=2 * 5, t_dim=14, feat_dim=8, nce_k=7, nce_t=0.07, nce_m=0.5, n_data=30)
BATCH, STEPS, LR = 6, 3, 0.5


# -- CRD, from its formula -----------------------------------------------------------------------
class CRDEmbed(nn.Module):
    """Flatten, linear, divide by the L2 norm."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.view(x.shape[0], -1))
        return x / x.pow(2).sum(1, keepdim=True).pow(0.5)


class CRDMemory(nn.Module):
    """memory_v1 (student rows), memory_v2 (teacher rows), U(-stdv, stdv) with
    stdv = 1/sqrt(dim/3), drawn in that order; params = [K, tau, Z_v1, Z_v2, momentum] in one
    float32 buffer (so tau and momentum are float32 values), Z -1 until the first batch sets it."""

    def __init__(self, dim: int, n_data: int, k: int, tau: float, momentum: float) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("params", torch.tensor([k, tau, -1.0, -1.0, momentum]))
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, dim) * (2 * stdv) - stdv)
        self.register_buffer("memory_v2", torch.rand(n_data, dim) * (2 * stdv) - stdv)

    @property
    def z(self) -> torch.Tensor:
        return self.params[2:4]

    def forward(self, v1, v2, y, contrast_idx=None):
        n_data, dim = self.memory_v1.shape
        b = v1.shape[0]
        tau, momentum = self.params[1].item(), self.params[4].item()
        if contrast_idx is None:
            contrast_idx = torch.randint(n_data, (b, self.k + 1))
            contrast_idx[:, 0] = y
        w1 = self.memory_v1[contrast_idx.reshape(-1)].detach().view(b, self.k + 1, dim)
        out_v2 = torch.exp(torch.bmm(w1, v2.view(b, dim, 1)) / tau)
        w2 = self.memory_v2[contrast_idx.reshape(-1)].detach().view(b, self.k + 1, dim)
        out_v1 = torch.exp(torch.bmm(w2, v1.view(b, dim, 1)) / tau)
        for i, out in enumerate((out_v1, out_v2)):
            if self.z[i] < 0:
                self.params[2 + i] = out.mean().detach() * n_data
        out_v1, out_v2 = out_v1 / self.z[0], out_v2 / self.z[1]
        with torch.no_grad():
            for memory, v in ((self.memory_v1, v1), (self.memory_v2, v2)):
                mixed = memory[y] * momentum + v * (1 - momentum)
                memory.index_copy_(0, y, mixed / mixed.pow(2).sum(1, keepdim=True).pow(0.5))
        return out_v1.view(b, -1), out_v2.view(b, -1)


def contrast_rows(x: torch.Tensor, n_data: int) -> torch.Tensor:
    """ContrastLoss before its sum over rows: x [B, 1 + K] -> [B]; the loss is rows.sum() / B."""
    m, pn, eps = x.shape[1] - 1, 1.0 / n_data, 1e-7
    p_pos, p_neg = x[:, 0], x[:, 1:]
    log_d1 = torch.log(p_pos / (p_pos + m * pn + eps))
    log_d0 = torch.log((m * pn) / (p_neg + m * pn + eps))
    return -(log_d1 + log_d0.sum(1))


class CRDLoss(nn.Module):
    def __init__(self, opt) -> None:
        super().__init__()
        self.embed_s = CRDEmbed(opt.s_dim, opt.feat_dim)
        self.embed_t = CRDEmbed(opt.t_dim, opt.feat_dim)
        self.contrast = CRDMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.n_data = opt.n_data

    def rows(self, f_s, f_t, idx, contrast_idx=None):
        """(student-query rows [B], teacher-query rows [B]); CRDLoss = (sum of both) / B."""
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)
        return contrast_rows(out_s, self.n_data), contrast_rows(out_t, self.n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        rows_s, rows_t = self.rows(f_s, f_t, idx, contrast_idx)
        return (rows_s.sum() + rows_t.sum()) / f_s.shape[0]


# -- helpers -------------------------------------------------------------------------------------
def twins(dtype: torch.dtype, **overrides):
    """CRDLoss and GACDLoss.from_crd_opt with the same heads and memories, in ``dtype``."""
    torch.manual_seed(0)
    crd = CRDLoss(OPT).to(dtype)
    ours = GACDLoss.from_crd_opt(OPT, **overrides).to(dtype)
    ours.embed_s.load_state_dict(crd.embed_s.state_dict())
    ours.embed_t.load_state_dict(crd.embed_t.state_dict())
    with torch.no_grad():
        ours.bank_s.rows.copy_(crd.contrast.memory_v1)  # student rows
        ours.bank_t.rows.copy_(crd.contrast.memory_v2)  # teacher rows
    return crd, ours


def batch(step: int, dtype: torch.dtype):
    """Features [B, 2, 5] (flattened by the heads) and [B, 14], distinct dataset rows, and a
    contrast_idx whose column 0 is the sample (negatives may repeat it, as CRD's may)."""
    g = torch.Generator().manual_seed(10 + step)
    f_s = torch.randn(BATCH, 2, 5, generator=g, dtype=dtype)
    f_t = torch.randn(BATCH, OPT.t_dim, generator=g, dtype=dtype)
    idx = torch.randperm(OPT.n_data, generator=g)[:BATCH]
    contrast = torch.cat([idx[:, None], torch.randint(OPT.n_data, (BATCH, OPT.nce_k), generator=g)], 1)
    return f_s, f_t, idx, contrast


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def step_and_compare(crd, ours, f_s, f_t, idx, contrast, dtype, what, ours_contrast="same"):
    """One training step of both (forward, backward, SGD); compare loss, gradients, memories."""
    (fs_a, ft_a), (fs_b, ft_b) = leaves(f_s, f_t), leaves(f_s, f_t)
    want = crd(fs_a, ft_a, idx, contrast)
    got = ours(fs_b, ft_b, idx, contrast if ours_contrast == "same" else ours_contrast)
    assert_close(got, want, dtype, f"{what} loss")
    want.backward()
    got.backward()
    assert_close(fs_b.grad, fs_a.grad, dtype, f"{what} grad f_s")
    assert_close(ft_b.grad, ft_a.grad, dtype, f"{what} grad f_t")
    for name, p_crd in crd.named_parameters():
        p_ours = ours.get_parameter(name)
        assert_close(p_ours.grad, p_crd.grad, dtype, f"{what} grad {name}")
    for module in (crd, ours):
        with torch.no_grad():
            for p in module.parameters():
                p -= LR * p.grad
                p.grad = None
    assert_close(ours.bank_s.rows, crd.contrast.memory_v1, dtype, f"{what} student memory")
    assert_close(ours.bank_t.rows, crd.contrast.memory_v2, dtype, f"{what} teacher memory")
    assert_close(ours.crd_z, crd.contrast.z, dtype, f"{what} Z")


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_from_crd_opt_equals_crd_over_steps(dtype):
    crd, ours = twins(dtype)
    assert ours.critic == "crd_nce" and ours.symmetric and ours.teacher_head == "train" and ours.weighting == "none"
    assert torch.equal(ours.crd_z, torch.full((2,), -1.0, dtype=dtype)), "Z is -1 until the first batch"
    for step in range(STEPS):
        step_and_compare(crd, ours, *batch(step, dtype), dtype, f"step {step}")
        assert bool((ours.crd_z > 0).all())
    # Z was set once, from the first batch (a later batch would give another value)
    z_first = twins(dtype)[1]
    z_first(*batch(0, dtype))
    assert torch.equal(ours.crd_z, z_first.crd_z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_seeded_run_reproduces_crds_run(dtype):
    """No weights copied: under the same seed from_crd_opt draws CRDLoss's heads and memories (CRD's
    order: embed_s, embed_t, memory_v1 = the student's bank_s, memory_v2 = the teacher's bank_t), so
    the first loss and every later step are CRD's (the memories once came out swapped: 12.370 vs
    12.182 on RepDistiller's first batch)."""
    torch.manual_seed(0)
    crd = CRDLoss(OPT).to(dtype)
    torch.manual_seed(0)
    ours = GACDLoss.from_crd_opt(OPT).to(dtype)
    assert torch.equal(ours.bank_s.rows, crd.contrast.memory_v1), "student memory (CRD's memory_v1)"
    assert torch.equal(ours.bank_t.rows, crd.contrast.memory_v2), "teacher memory (CRD's memory_v2)"
    for name, p_crd in crd.named_parameters():
        assert torch.equal(ours.get_parameter(name), p_crd), name
    for step in range(STEPS):
        step_and_compare(crd, ours, *batch(step, dtype), dtype, f"seeded step {step}")


def test_tau_and_momentum_are_crds_float32_values():
    """CRD keeps nce_t and nce_m in a float32 buffer; from_crd_opt rounds them the same way."""
    opt = SimpleNamespace(**{**vars(OPT), "nce_m": 0.9})
    ours, crd = GACDLoss.from_crd_opt(opt), CRDMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
    assert ours.temperature == crd.params[1].item() != 0.07
    assert ours.bank_t.momentum == ours.bank_s.momentum == crd.params[4].item() != 0.9
    with pytest.raises(TypeError, match="opt.nce_t must be a real number"):
        GACDLoss.from_crd_opt(SimpleNamespace(**{**vars(OPT), "nce_t": "0.07"}))


def test_without_contrast_idx_the_drawn_rows_give_crd_loss():
    """contrast_idx=None: the module draws as sample_contrast_index does, from the global RNG.
    CRDLoss's own draw (uniform over every row, the sample's own included) is another draw, so
    the test re-draws ours under the same seed and hands those rows to CRD's formula."""
    dtype = torch.float64
    crd, ours = twins(dtype)
    for step in range(STEPS):
        f_s, f_t, idx, _ = batch(step, dtype)
        torch.manual_seed(1000 + step)
        drawn = ours.sample_contrast_index(idx)
        assert drawn.shape == (BATCH, 1 + OPT.nce_k) and torch.equal(drawn[:, 0], idx)
        assert bool((drawn[:, 1:] != idx[:, None]).all()), "a drawn negative is never the sample's row"
        torch.manual_seed(1000 + step)
        step_and_compare(crd, ours, f_s, f_t, idx, drawn, dtype, f"step {step}", ours_contrast=None)


def test_confidence_weighting_is_one_keyword_away():
    dtype = torch.float64
    crd, ours = twins(dtype, weighting="confidence")
    f_s, f_t, idx, contrast = batch(0, dtype)
    logits, y = torch.randn(BATCH, 5, dtype=dtype), torch.randint(5, (BATCH,))
    with pytest.raises(ValueError, match="teacher_logits"):
        ours(f_s, f_t, idx, contrast)
    got = ours(f_s, f_t, idx, contrast, teacher_logits=logits, targets=y)
    rows_s, rows_t = crd.rows(f_s, f_t, idx, contrast)
    w = logits.float().softmax(1)[torch.arange(BATCH), y].to(dtype)  # teacher_weights are float32
    assert_close(got, (w * (rows_s + rows_t)).sum() / w.sum(), dtype, "confidence-weighted mean")
    unweighted = (rows_s + rows_t).mean()
    assert abs(float((got - unweighted).detach())) > 1e-3, "the weights must change the loss"


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions(reduction):
    dtype = torch.float64
    crd, ours = twins(dtype, reduction=reduction)
    f_s, f_t, idx, contrast = batch(0, dtype)
    rows_s, rows_t = crd.rows(f_s, f_t, idx, contrast)
    want = rows_s + rows_t if reduction == "none" else (rows_s + rows_t).sum()
    assert_close(ours(f_s, f_t, idx, contrast), want, dtype, reduction)


def test_z_is_saved_with_the_state_dict():
    dtype = torch.float64
    _, ours = twins(dtype)
    ours(*batch(0, dtype))
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    resumed = GACDLoss.from_crd_opt(OPT).to(dtype)
    resumed.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert bool((resumed.crd_z > 0).all()) and torch.equal(resumed.crd_z, ours.crd_z)
    assert torch.equal(resumed(*batch(1, dtype)), ours(*batch(1, dtype)))


def test_options_are_validated():
    with pytest.raises(ValueError, match="crd_nce.*bank='memory'"):
        GACDLoss(10, 14, num_data=30, critic="crd_nce", bank="queue")
    with pytest.raises(ValueError, match="num_data"):
        GACDLoss(10, 14, critic="crd_nce")
    with pytest.raises(TypeError, match="nce_k"):
        GACDLoss.from_crd_opt(SimpleNamespace(s_dim=10, t_dim=14, feat_dim=8))
    plain = GACDLoss.from_crd_opt(OPT, critic="infonce")  # overrides replace CRD's choices
    assert plain.critic == "infonce" and "crd_z" not in plain.state_dict()
