"""Mixed precision: ``precision=`` on every attack (values against an autocast loop written here,
result dtypes, model mode, errors), GACDLoss with half features, and ``bank_dtype``.

The values are checked against loops that spell out the contract (model under autocast, loss in
float32 outside it, step in the images' dtype), so a bf16 attack equals its oracle to the bit.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gacd_fast
from gacd_fast import FGSM, PGD, GACDLoss, _precision
from gacd_fast.attacks import FP16_LOSS_SCALE
from gacd_fast.ops import reference
from checks import backend_params
from tolerances import assert_close

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def _no_emulation_warning():
    """These tests run half precisions on CPUs without the instructions on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*runs emulated on this CPU", category=RuntimeWarning)
        yield


class Net(nn.Module):
    """conv-bn-relu-linear returning (features, logits); ``scale`` shrinks the logits (small gradients)."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 5 * 5, 4)
        self.scale = scale

    def forward(self, x):
        f = F.relu(self.bn(self.conv(x))).flatten(1)
        return f, self.fc(f) * self.scale


def data(b=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, 5, 5, generator=g).to(dtype), torch.randint(4, (b,), generator=g)


def oracle_pgd(model, x, y, *, eps, alpha, steps, precision, start=None):
    """The contract literally: forward under autocast, float32 CE outside it, fp16's loss scale,
    torchattacks' step in the images' dtype."""
    model.eval()
    adv = x.clone() if start is None else torch.clamp(x + start, 0, 1)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        with torch.autocast(x.device.type, dtype=HALF[precision]):
            out = model(adv)
        cost = F.cross_entropy(out[1].float(), y)
        scale = FP16_LOSS_SCALE if precision == "fp16" else 1.0
        grad = torch.autograd.grad(cost * scale, adv)[0] / scale
        adv = adv.detach() + alpha * grad.sign()
        adv = torch.clamp(x + torch.clamp(adv - x, min=-eps, max=eps), min=0, max=1)
    return adv.detach()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_pgd_and_fgsm_equal_the_autocast_loop(precision):
    torch.manual_seed(0)
    model = Net()
    x, y = data()
    got = PGD(model, eps=0.1, alpha=0.03, steps=4, random_start=False, precision=precision)(x, y)
    assert torch.equal(got, oracle_pgd(model, x, y, eps=0.1, alpha=0.03, steps=4, precision=precision))
    fgsm = FGSM(model, eps=0.1, precision=precision)(x, y)
    assert torch.equal(fgsm, oracle_pgd(model, x, y, eps=0.1, alpha=0.1, steps=1, precision=precision))
    # the random start is drawn as in fp32 (from the generator), the steps in the precision
    g = torch.Generator().manual_seed(5)
    start = torch.empty_like(x).uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(5))
    got = PGD(model, eps=0.1, alpha=0.03, steps=2, generator=g, precision=precision)(x, y)
    assert torch.equal(got, oracle_pgd(model, x, y, eps=0.1, alpha=0.03, steps=2, precision=precision, start=start))


def test_fp32_is_the_default_and_adds_no_autocast():
    torch.manual_seed(0)
    model = Net()
    x, y = data()
    atk = PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False)
    assert atk.precision == "fp32" and FGSM(model).precision == "fp32"
    seen = []

    def loss(out, targets):
        seen.append((out[1].dtype, torch.is_autocast_enabled("cpu")))
        return F.cross_entropy(out[1], targets)

    PGD(model, eps=0.1, alpha=0.03, steps=1, loss=loss)(x, y)
    assert seen == [(torch.float32, False)]
    assert torch.equal(atk(x, y), PGD(model, eps=0.1, alpha=0.03, steps=3, random_start=False, precision="fp32")(x, y))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_result_dtype_and_what_a_custom_loss_receives(precision, dtype):
    model = Net()
    x, y = data(dtype=dtype)
    seen = []

    def loss(out, targets):  # the outputs as the model produced them, outside the autocast region
        seen.append((out[0].dtype, out[1].dtype, torch.is_autocast_enabled("cpu")))
        return out[0].float().pow(2).mean()

    for atk in (PGD(model, eps=0.1, alpha=0.03, steps=2, precision=precision),
                PGD(model, eps=0.1, alpha=0.03, steps=2, loss=loss, precision=precision),
                FGSM(model, eps=0.1, precision=precision)):
        adv = atk(x, y)
        assert adv.dtype == dtype and not adv.requires_grad
        assert (adv - x).float().abs().max() <= 0.1 + torch.finfo(dtype).eps and adv.min() >= 0 and adv.max() <= 1
    assert seen == [(HALF[precision], HALF[precision], False)] * 2


def test_fp16_loss_scale_keeps_small_gradients():
    """A mean CE over a model with small logits: unscaled, most fp16 input gradients flush to zero
    (no step there); the attack's loss scale keeps them."""
    torch.manual_seed(0)
    model = Net(scale=1e-4).eval()
    x, y = data(32)
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(xr)
    unscaled = torch.autograd.grad(F.cross_entropy(out[1].float(), y), xr)[0]
    grad = PGD(model, precision="fp16")._gradient(x, y)
    assert (unscaled == 0).float().mean() > 0.5, "the case must underflow without a scale"
    assert (grad == 0).float().mean() < 0.05
    fp32 = PGD(model)._gradient(x, y)
    assert (grad.sign() == fp32.sign()).float().mean() > 0.9


def test_fp32_attack_in_an_enclosing_fp16_region_scales_its_loss():
    """The pipeline trains under an autocast region and builds its attacks with the default
    precision: under fp16 the loss scale must still apply."""
    torch.manual_seed(0)
    model = Net(scale=1e-4).eval()
    x, y = data(32)
    with torch.autocast("cpu", dtype=torch.float16):
        inherited = PGD(model)._gradient(x, y)
    assert torch.equal(inherited, PGD(model, precision="fp16")._gradient(x, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(PGD(model)._gradient(x, y), PGD(model, precision="bf16")._gradient(x, y))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_model_mode_restored_also_after_an_exception(precision):
    model = Net()
    model.train()
    model.bn.eval()
    flags = [m.training for m in model.modules()]
    x, y = data()
    for mode in ("eval", "train", "keep"):
        PGD(model, eps=0.1, alpha=0.03, steps=2, model_mode=mode, precision=precision)(x, y)
        PGD(model, eps=0.1, alpha=0.03, steps=1, precision=precision).set_mode_targeted_least_likely()(x, y)
        assert [m.training for m in model.modules()] == flags

    def failing(out, labels):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        PGD(model, steps=1, loss=failing, precision=precision)(x, y)
    assert [m.training for m in model.modules()] == flags
    assert not torch.is_autocast_enabled("cpu"), "the autocast region must be left after an exception"


def test_every_attack_takes_precision_through_the_base():
    class OneStep(gacd_fast.Attack):
        def _perturb(self, x_nat, x_adv, labels, eps):
            return gacd_fast.pgd_step_(x_adv, self._gradient(x_adv, labels), x_nat, alpha=eps, eps=eps)

    model = Net()
    x, y = data()
    got = OneStep(model, 0.1, precision="bf16")(x, y)
    assert torch.equal(got, FGSM(model, eps=0.1, precision="bf16")(x, y))
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\], got 'fp64'"):
        OneStep(model, 0.1, precision="fp64")


@pytest.mark.parametrize("make", [lambda m, p: PGD(m, precision=p), lambda m, p: FGSM(m, precision=p)],
                         ids=["PGD", "FGSM"])
@pytest.mark.parametrize("value,exc", [("float16", ValueError), ("BF16", ValueError), (None, ValueError),
                                       (torch.bfloat16, ValueError)])
def test_bad_precision_values(make, value, exc):
    with pytest.raises(exc, match="precision must be one of"):
        make(Net(), value)


def test_a_precision_the_device_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(_precision._verdicts, ("bf16", "cpu"), "no bf16 here (injected)")
    x, y = data()
    with pytest.raises(RuntimeError, match=r"PGD: precision='bf16' cannot run on cpu: no bf16 here \(injected\)"):
        PGD(Net(), precision="bf16")(x, y)
    with pytest.raises(RuntimeError, match=r"FGSM: precision='bf16' cannot run on cpu"):
        FGSM(Net(), precision="bf16")(x, y)
    PGD(Net(), steps=1, precision="fp16")(x, y)  # the other precisions are unaffected
    assert "no autocast for meta" in _precision.unsupported_reason("bf16", torch.device("meta"))
    assert _precision.unsupported_reason("fp32", torch.device("meta")) is None


def test_emulated_precision_warns_once(monkeypatch):
    monkeypatch.setattr(_precision, "_warned", set())
    monkeypatch.setattr(_precision, "is_native", lambda precision, device: False)
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PGD(Net(), steps=1, precision="bf16")(x, y)
        PGD(Net(), steps=1, precision="bf16")(x, y)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "precision='bf16' runs emulated on this CPU" in msgs[0] and "AVX512-BF16" in msgs[0]


# ------------------------------------------------------------------------------ GACDLoss
def crit_and_features(**kw):
    torch.manual_seed(0)
    crit = GACDLoss(10, 14, num_data=40, embed_dim=8, num_negatives=16, weighting="none", **kw)
    return crit, torch.randn(6, 10), torch.randn(6, 14), torch.arange(6), torch.randint(40, (6, 17))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_features_outside_autocast(half):
    """Was a raw matmul dtype error: half features into a float32 GACDLoss."""
    crit, f_s, f_t, idx, contrast = crit_and_features()
    fs, ft = f_s.to(half).requires_grad_(True), f_t.to(half)
    loss = crit(fs, ft, idx, contrast, update_bank=False)
    want = crit(fs.detach().float(), ft.float(), idx, contrast, update_bank=False)
    assert loss.dtype == torch.float32 and torch.equal(loss, want)
    (grad,) = torch.autograd.grad(loss, fs)
    assert grad.dtype == half and torch.isfinite(grad).all()


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bank", ["memory", "queue", "batch"])
def test_features_from_an_autocast_region(half, bank):
    crit, f_s, f_t, idx, contrast = crit_and_features(bank=bank, symmetric=bank != "batch")
    contrast = contrast if bank == "memory" else None
    student = nn.Linear(10, 10)
    want = crit(student(f_s), f_t, idx, contrast, update_bank=False)
    with torch.autocast("cpu", dtype=half):
        fs = student(f_s)
        assert fs.dtype == half
        loss = crit(fs, f_t, idx, contrast, update_bank=False)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, want, half, "loss from an autocast region vs float32")
    loss.backward()
    assert student.weight.grad.dtype == torch.float32 and torch.isfinite(student.weight.grad).all()
    assert crit.embed_s.linear.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("bank", ["memory", "queue", "batch"])
def test_an_autocast_region_does_not_change_a_float32_loss(bank):
    """The heads and the ops run in float32 inside a bf16 region: float32 features give the float32
    loss and gradients to the bit (the torch backend used to multiply the float32 rows in bf16)."""
    crit, f_s, f_t, idx, contrast = crit_and_features(bank=bank, symmetric=bank != "batch")
    contrast = contrast if bank == "memory" else None
    results = []
    for region in (False, True):
        crit.zero_grad()
        fs = f_s.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=region):
            assert crit.embed_s(f_s).dtype == torch.float32
            loss = crit(fs, f_t, idx, contrast, update_bank=False)
        loss.backward()
        results.append((loss, fs.grad, crit.embed_s.linear.weight.grad.clone()))
    for name, a, b in zip(("loss", "d f_s", "d head"), *results):
        assert torch.equal(a, b), name


def check_ops_ignore_an_autocast_region(backend: str, device: str) -> None:
    """info_nce, cosine_similarity and l2_normalize of float32 inputs: the same float32 results,
    to the bit, inside a bf16 autocast region and outside it."""
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.randn(shape, generator=g).to(device) for shape in ((3, 8), (3, 8), (7, 8)))
    calls = {
        "info_nce": lambda: gacd_fast.info_nce(q, p, n, backend=backend, reduction="none"),
        "cosine_similarity": lambda: gacd_fast.cosine_similarity(q, p, backend=backend),
        "l2_normalize": lambda: gacd_fast.l2_normalize(n, backend=backend),
    }
    for name, call in calls.items():
        want = call()
        with torch.autocast(device, dtype=torch.bfloat16):
            got = call()
        assert got.dtype == want.dtype == torch.float32 and torch.equal(got, want), name


@pytest.mark.parametrize("backend", backend_params(gacd_fast.available_backends("cpu")))
def test_ops_compute_in_their_inputs_dtype_inside_an_autocast_region(backend):
    check_ops_ignore_an_autocast_region(backend, "cpu")


@pytest.mark.parametrize("bank", ["memory", "queue"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_bf16_bank_stores_half_rows_and_gives_a_float32_loss(bank, symmetric):
    crit, f_s, f_t, idx, contrast = crit_and_features(bank=bank, symmetric=symmetric, bank_dtype="bf16")
    contrast = contrast if bank == "memory" else None
    ref, *_ = crit_and_features(bank=bank, symmetric=symmetric)
    ref.load_state_dict(crit.state_dict())  # the same heads and the same (rounded) rows, in float32
    banks = [crit.bank_t] + ([crit.bank_s] if symmetric else [])
    assert all(b.rows.dtype == torch.bfloat16 and b.rows_dtype == torch.bfloat16 for b in banks)
    assert ref.bank_t.rows.dtype == torch.float32 and torch.equal(ref.bank_t.rows, crit.bank_t.rows.float())
    crit.eval(), ref.eval()
    fs = f_s.clone().requires_grad_(True)
    loss = crit(fs, f_t, idx, contrast)
    want = ref(f_s, f_t, idx, contrast)
    assert loss.dtype == torch.float32
    assert_close(loss, want, torch.bfloat16, "bf16 bank vs float32 bank")
    loss.backward()
    assert fs.grad.dtype == torch.float32 and torch.isfinite(fs.grad).all()


def test_bf16_bank_update_and_prefill_round_once():
    crit, f_s, f_t, idx, _ = crit_and_features(bank_dtype="bf16", momentum=0.5)
    before = crit.bank_t.rows.clone()
    crit.train()
    crit(f_s, f_t, idx)
    t = crit.embed_t(f_t).detach()
    want = F.normalize(0.5 * before[idx].float() + 0.5 * t.to(torch.bfloat16).float(), dim=1).to(torch.bfloat16)
    assert crit.bank_t.rows.dtype == torch.bfloat16 and torch.equal(crit.bank_t.rows[idx], want)
    crit.prefill(f_t, idx)
    assert torch.equal(crit.bank_t.rows[idx], F.normalize(t, dim=1).to(torch.bfloat16))
    queue = GACDLoss(10, 14, bank="queue", embed_dim=8, num_negatives=4, weighting="none", bank_dtype="bf16")
    queue.prefill(f_t)
    assert queue.bank_t.rows.dtype == torch.bfloat16
    assert torch.equal(queue.bank_t.rows, queue.embed_t(f_t)[-4:].detach().to(torch.bfloat16))


def test_bf16_bank_loss_equals_the_reference_on_its_rows():
    crit, f_s, f_t, idx, contrast = crit_and_features(bank_dtype="bf16")
    rows = crit.bank_t.rows.clone()
    loss = crit(f_s, f_t, idx, contrast, update_bank=False)
    s = crit.embed_s(f_s).to(torch.bfloat16)
    t = crit.embed_t(f_t).to(torch.bfloat16)
    want = reference.info_nce_rows(s, t, rows, contrast[:, 1:], 0.07, True).mean()
    assert_close(loss, want, torch.bfloat16, "bf16 bank loss")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(bank_dtype="fp16"), ValueError, r"bank_dtype must be one of \['fp32', 'bf16'\], got 'fp16'"),
    (dict(bank_dtype=torch.bfloat16), ValueError, "bank_dtype must be one of"),
    (dict(bank="batch", bank_dtype="bf16"), ValueError, "bank='batch' stores none"),
])
def test_bad_bank_dtype(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GACDLoss(10, 14, num_data=40, **kwargs)


def test_banks_refuse_other_row_dtypes():
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        gacd_fast.MemoryBank(10, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.bfloat16"):
        gacd_fast.FeatureQueue(10, 4, dtype=torch.float64)


def test_bf16_bank_state_dict_round_trip():
    crit, f_s, f_t, idx, _ = crit_and_features(bank_dtype="bf16")
    crit.train()
    crit(f_s, f_t, idx)
    other, *_ = crit_and_features(bank_dtype="bf16")
    other.load_state_dict(crit.state_dict())
    assert other.bank_t.rows.dtype == torch.bfloat16 and torch.equal(other.bank_t.rows, crit.bank_t.rows)


# ------------------------------------------------------------------------------ on a GPU (owed)
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_attacks_follow_the_autocast_loop(precision):
    """On CUDA: the attack against the same loop written out (cuDNN may pick other algorithms
    between runs: almost every pixel equal), and the loss in float32."""
    reason = _precision.unsupported_reason(precision, torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = Net().cuda()
    x, y = (t.cuda() for t in data(64))
    got = PGD(model, eps=0.1, alpha=0.03, steps=4, random_start=False, precision=precision)(x, y)
    want = oracle_pgd(model, x, y, eps=0.1, alpha=0.03, steps=4, precision=precision)
    assert got.dtype == torch.float32 and (got == want).float().mean() > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("bank_dtype", ["fp32", "bf16"])
def test_gpu_gacd_loss_with_half_features_and_banks(bank_dtype):
    crit, f_s, f_t, idx, contrast = crit_and_features(bank_dtype=bank_dtype)
    ref, *_ = crit_and_features()
    ref.load_state_dict(crit.state_dict())
    crit, ref = crit.cuda(), ref.cuda()
    f_s, f_t, idx, contrast = (t.cuda() for t in (f_s, f_t, idx, contrast))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = crit(f_s, f_t, idx, contrast, update_bank=False)
    assert loss.dtype == torch.float32
    assert_close(loss, ref(f_s, f_t, idx, contrast, update_bank=False), torch.bfloat16, "cuda bf16 vs fp32")


@pytest.mark.gpu
def test_gpu_ops_compute_in_their_inputs_dtype_inside_an_autocast_region():
    for backend in gacd_fast.available_backends("cuda"):
        check_ops_ignore_an_autocast_region(backend, "cuda")
