"""Bad values the library must refuse or get right (issue 18, sections 2-5): attack labels and
options, the two banks of the symmetric loss, CRD's normaliser at a tiny temperature, and rows of
huge finite values on every backend."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gacd_fast
import oracles
from gacd_fast import FGSM, PGD, GACDLoss
from gacd_fast.ops import cext_backend, cext_build
from tolerances import assert_close


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10))


def images(b=4):
    return torch.rand(b, 3, 2, 2)


# -- section 2, row 4: untargeted attacks check their labels as targeted ones do ----------------

@pytest.mark.parametrize("attack", [lambda m: PGD(m, 0.1, 0.02, 2), lambda m: FGSM(m, 0.1)])
@pytest.mark.parametrize("bad", [10, 11, -1, -100])
def test_untargeted_label_out_of_range(attack, bad):
    """-100 is cross-entropy's ignore_index (the sample would silently not be attacked); >= C a
    device-side assertion on CUDA. Both are the IndexError of the targeted modes."""
    y = torch.tensor([0, 1, bad, 3])
    with pytest.raises(IndexError, match=r"targets must hold indices in \[0, 10\)"):
        attack(model())(images(), y)
    ok = attack(model())(images(), torch.tensor([0, 1, 9, 3]))
    assert ok.shape == (4, 3, 2, 2)
    gacd_fast.set_value_checks(False)  # the opt-out skips it, as for every value check
    attack(model())(images(), torch.tensor([0, 1, 2, -100]))


def test_untargeted_label_check_is_one_forward_free():
    """The range is checked on the first step's logits: no extra forward of the model."""
    calls = []
    m = model()
    m.register_forward_hook(lambda *a: calls.append(1))
    PGD(m, 0.1, 0.02, 3)(images(), torch.tensor([0, 1, 2, 3]))
    assert len(calls) == 3


# -- section 4, rows 13-14, and the empty batch ---------------------------------------------

def test_per_sample_alpha_must_be_nonnegative():
    with pytest.raises(ValueError, match="alpha must be >= 0 for every sample"):
        PGD(model(), 0.1, torch.tensor([0.01, -0.1, 0.01, 0.01]), 2)(images(), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="alpha must be finite"):
        PGD(model(), 0.1, torch.tensor([0.01, float("nan"), 0.01, 0.01]), 2)(images(), torch.tensor([0, 1, 2, 3]))


@pytest.mark.parametrize("norm", [((0.5, float("nan"), 0.5), (0.2,) * 3), ((0.5,) * 3, (0.2, float("inf"), 0.2)),
                                  ((float("-inf"),) * 3, (0.2,) * 3)])
def test_normalization_must_be_finite(norm):
    with pytest.raises(ValueError, match="normalization mean and std must be finite"):
        PGD(model(), 0.1, 0.02, 2, normalization=norm)


def test_an_empty_batch_names_images():
    x, y = images(), torch.tensor([0, 1, 2, 3])
    for attack in (PGD(model(), 0.1, 0.02, 2), FGSM(model(), 0.1)):
        with pytest.raises(ValueError, match=r"images must hold at least one image.*\(0, 3, 2, 2\)"):
            attack(x[:0], y[:0])


# -- section 3, row 10: the symmetric loss validates both banks before writing either ------------

OPT = SimpleNamespace(s_dim=6, t_dim=5, feat_dim=4, nce_k=3, nce_t=0.07, nce_m=0.5, n_data=12)


@pytest.mark.parametrize("bank", ["memory", "queue"])
@pytest.mark.parametrize("critic", ["crd_nce", "infonce"])
def test_symmetric_banks_stay_in_step(bank, critic):
    if critic == "crd_nce" and bank != "memory":
        pytest.skip("crd_nce needs the memory bank")
    torch.manual_seed(0)
    crit = GACDLoss.from_crd_opt(OPT, bank=bank, critic=critic)
    f_s, f_t, idx = torch.randn(4, 6), torch.randn(4, 5), torch.tensor([0, 3, 5, 7])
    crit(f_s, f_t, idx)  # sets Z, fills the banks once
    before = {k: v.clone() for k, v in crit.state_dict().items()}
    f_s, f_t = torch.randn(4, 6), torch.randn(4, 5)  # new rows: an update would change the banks
    f_s[2, 1] = float("nan")
    with pytest.raises(ValueError, match="holds NaN or inf"):
        crit(f_s, f_t, idx)
    after = crit.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "bank" in k), "a bank moved"


# -- section 4, row 20: CRD's normaliser at a tiny temperature ------------------------------------

def test_tiny_crd_temperature_is_refused_before_anything_is_stored():
    torch.manual_seed(0)
    crit = GACDLoss.from_crd_opt(SimpleNamespace(**{**vars(OPT), "nce_t": 0.01}))
    f_s, f_t, idx = torch.randn(4, 6), torch.randn(4, 5), torch.tensor([0, 3, 5, 7])
    with torch.no_grad():  # the stored rows are the samples' own embeddings: s = 1, exp(1 / 0.01) = 2.7e43
        crit.bank_t.rows[idx] = crit.embed_s(f_s)
    rows = crit.bank_t.rows.clone(), crit.bank_s.rows.clone()
    with pytest.raises(ValueError, match=r"temperature \(CRD's nce_t\) 0.01 is too small"):
        crit(f_s, f_t, idx)
    assert torch.equal(crit.crd_z, torch.full((2,), -1.0))
    assert torch.equal(crit.bank_t.rows, rows[0]) and torch.equal(crit.bank_s.rows, rows[1])


def test_crd_normaliser_is_computed_in_float64():
    """exp(s/tau) overflows float32 above s/tau = 88.7; Z itself may still fit."""
    torch.manual_seed(0)
    opt = SimpleNamespace(**{**vars(OPT), "nce_t": 0.0105, "nce_k": 40, "n_data": 50})
    crit = GACDLoss.from_crd_opt(opt)
    f_s, f_t = torch.randn(2, 6), torch.randn(2, 5)
    idx = torch.tensor([0, 1])
    with torch.no_grad():
        crit.bank_t.rows.mul_(0.01)
        crit.bank_s.rows.mul_(0.01)
        crit.bank_t.rows[0] = crit.embed_s(f_s)[0] * 0.9345  # one score of 0.9345 / 0.0105 = 89: exp 4.5e38
    contrast = torch.cat([idx[:, None], torch.randint(2, 50, (2, 40))], 1)
    loss = crit(f_s, f_t, idx, contrast, update_bank=False)
    z = float(crit.crd_z[0])
    assert torch.isfinite(loss) and 0 < z < torch.finfo(torch.float32).max
    s = crit.embed_s(f_s).double()
    scores = torch.einsum("bd,bkd->bk", s, crit.bank_t.rows.double()[contrast])
    assert z == pytest.approx(float((scores / opt.nce_t).exp().mean()) * opt.n_data, rel=1e-5)


# -- section 4, row 16: rows of 1e38 give torch's answer on every backend --------------------------

@pytest.fixture(scope="module")
def backends_here():
    """torch and the C++ extension (built here when it can be). The Triton kernels are not in the list
    yet: under the interpreter their info_nce gives NaN for such rows (an open item of issue 18)."""
    names = ["torch"]
    if cext_build.build_problem() is None or cext_backend.is_built():
        cext_backend.load()
        names.append("cext")
    return names


def huge_rows():
    big = torch.full((3, 20), 1e38)
    big[1] *= -0.5
    big[2, :10] = 2e37
    return big


@pytest.mark.slow
def test_huge_finite_rows_normalise_on_every_backend(backends_here):
    x = huge_rows().requires_grad_()
    want = oracles.normalize(x.detach().double())
    g = torch.randn(3, 20)
    (dwant,) = torch.autograd.grad(oracles.normalize(x.double()), x, g.double())
    for name in backends_here:
        got = gacd_fast.l2_normalize(x, backend=name)
        assert_close(got, want, torch.float32, f"{name} l2_normalize")
        (dx,) = torch.autograd.grad(got, x, g)
        assert_close(dx, dwant, torch.float32, f"{name} d x")
        assert_close(gacd_fast.cosine_similarity(x, x.flip(0), backend=name),
                     oracles.cosine_similarity(x.detach().double(), x.detach().double().flip(0)), torch.float32, name)


@pytest.mark.slow
@pytest.mark.parametrize("huge", ["query", "negatives", "all"])
@pytest.mark.parametrize("mode", ["bank", "neg_index"])
def test_huge_finite_rows_in_info_nce_on_every_backend(backends_here, huge, mode):
    torch.manual_seed(0)
    big, small = huge_rows(), torch.randn(4, 20)
    q = big if huge in ("query", "all") else small[:3]
    p = big.flip(0) if huge == "all" else small[1:]
    n = torch.cat([big, small]) if huge in ("negatives", "all") else small
    idx = torch.tensor([[0, 1, 4], [2, 3, 5], [6, 0, 1]]).clamp(max=n.shape[0] - 1) if mode == "neg_index" else None
    q64, p64, n64 = (t.double().requires_grad_() for t in (q, p, n))
    want = oracles.info_nce_rows(q64, p64, n64, idx, 0.07, True)
    wgrads = torch.autograd.grad(want.sum(), (q64, p64, n64))
    for name in backends_here:
        ins = [t.clone().requires_grad_() for t in (q, p, n)]
        got = gacd_fast.info_nce(*ins, neg_index=idx, reduction="none", backend=name)
        assert_close(got, want, torch.float32, f"{name} loss")
        for what, a, b in zip("qpn", torch.autograd.grad(got.sum(), ins), wgrads):
            assert_close(a, b, torch.float32, f"{name} d{what}")


@pytest.mark.interpreter
def test_huge_query_rows_in_triton_info_nce():
    """Rows of norm above float32's range (twenty entries of 1e38): the Triton row norms overflowed to
    inf (normalised rows 0, info_nce NaN); now the quotient is formed from max|x| and the scaled sum."""
    if "triton" not in gacd_fast.available_backends("cpu"):
        pytest.skip("needs triton under TRITON_INTERPRET=1")
    q, small = huge_rows(), torch.randn(4, 20)
    want = oracles.info_nce_rows(q.double(), small[1:].double(), small.double(), None, 0.07, True)
    assert_close(gacd_fast.info_nce(q, small[1:], small, reduction="none", backend="triton"), want, torch.float32,
                 "triton loss")
    x = q.clone().requires_grad_()
    got = gacd_fast.l2_normalize(x, backend="triton")
    xd = q.double().requires_grad_()
    want = oracles.normalize(xd)
    assert_close(got, want, torch.float32, "triton l2_normalize")
    cot = torch.rand(got.shape, dtype=torch.float64)
    (g,) = torch.autograd.grad(got, x, cot.float())
    (w,) = torch.autograd.grad(want, xd, cot)
    assert_close(g, w, torch.float32, "triton d l2_normalize")
    c = gacd_fast.cosine_similarity(q, small[1:], backend="triton")
    assert_close(c, oracles.cosine_similarity(q.double(), small[1:].double()), torch.float32, "triton cosine")


# -- section 5: crd_nce and torch.compile ---------------------------------------------------------

@pytest.mark.slow
def test_crd_nce_compiles_with_a_graph_break_only():
    """crd_nce reads its normaliser Z on the host (CRD's .item()), so it is the documented exception to
    fullgraph=True; without fullgraph it compiles and gives eager's loss."""
    torch.manual_seed(0)
    crit = GACDLoss.from_crd_opt(OPT)
    twin = GACDLoss.from_crd_opt(OPT)
    twin.load_state_dict(crit.state_dict())
    f_s, f_t, idx = torch.randn(4, 6), torch.randn(4, 5), torch.tensor([0, 3, 5, 7])
    contrast = torch.cat([idx[:, None], torch.randint(12, (4, 3))], 1)
    explained = torch._dynamo.explain(twin)(f_s, f_t, idx, contrast)
    assert explained.graph_break_count >= 1
    twin.load_state_dict(crit.state_dict())
    got = torch.compile(crit, backend="eager")(f_s, f_t, idx, contrast)
    assert_close(got, twin(f_s, f_t, idx, contrast), torch.float32, "compiled crd_nce")
