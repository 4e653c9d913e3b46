"""pgd_step_, PGD and FGSM: projections, torchattacks parity (untargeted and targeted), mode
restoration, no side effects, argument checks; the Attack base as the extension point."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gacd_fast
import oracles
from gacd_fast import FGSM, PGD


def images(b=5, shape=(3, 7, 9), dtype=torch.float32):
    return torch.rand(b, *shape, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_linf_step_bitwise_torchattacks_order(dtype):
    x = images(dtype=dtype)
    adv = (x + (torch.rand_like(x.float()) * 0.06 - 0.03).to(dtype)).clamp(0, 1)
    grad = torch.randn_like(x)
    grad[0, 0, 0] = 0  # sign(0) = 0
    want = oracles.pgd_linf_step(adv, grad, x, 2 / 255, 8 / 255, 0.0, 1.0)
    out = gacd_fast.pgd_step_(adv, grad, x, alpha=2 / 255, eps=8 / 255)
    assert out is adv and torch.equal(out, want)


def test_linf_step_per_sample_tensors():
    x, grad = images(), torch.randn(5, 3, 7, 9)
    adv = x.clone()
    alpha, eps = torch.tensor([0.0, 0.01, 0.02, 0.5, 0.1]), torch.tensor([0.0, 0.05, 0.01, 0.2, 0.1])
    gacd_fast.pgd_step_(adv, grad, x, alpha=alpha, eps=eps)
    for i in range(5):
        want = oracles.pgd_linf_step(x[i], grad[i], x[i], float(alpha[i]), float(eps[i]), 0.0, 1.0)
        torch.testing.assert_close(adv[i], want, rtol=0, atol=1e-7)
    assert torch.equal(adv[0], x[0])


def test_linf_step_clip_range():
    x = torch.rand(4, 10) * 2 - 1
    adv = x.clone()
    gacd_fast.pgd_step_(adv, torch.randn(4, 10), x, alpha=0.3, eps=0.5, clip_min=-1, clip_max=1)
    assert adv.min() >= -1 and adv.max() <= 1 and (adv - x).abs().max() <= 0.5 + 1e-7


def test_l2_step_matches_definition():
    torch.manual_seed(1)
    x = images(dtype=torch.float64)
    adv = (x + 0.01 * torch.randn_like(x)).clamp(0, 1)
    grad = torch.randn_like(x)
    grad[2] = 0  # no step where ||grad|| == 0
    start = adv.clone()
    gacd_fast.pgd_step_(adv, grad, x, alpha=0.5, eps=0.3, norm="l2")
    for i in range(5):
        g = grad[i]
        step = 0.5 * g / g.norm() if g.norm() > 0 else torch.zeros_like(g)
        delta = start[i] + step - x[i]
        delta = delta * min(1.0, 0.3 / float(delta.norm()))
        torch.testing.assert_close(adv[i], (x[i] + delta).clamp(0, 1))
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.3 + 1e-9).all()


def test_gradcheck_is_not_needed_but_step_is_in_place_only():
    x = images()
    adv = x.clone().requires_grad_()
    with pytest.raises(ValueError, match="x_adv"):
        gacd_fast.pgd_step_(adv, torch.randn_like(x), x, alpha=0.1, eps=0.1)


class TinyNet(nn.Module):
    def __init__(self, out=(4,), dropout=True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5) if dropout else nn.Identity()
        self.fc = nn.Linear(4 * 7 * 9, 4)
        self.tuple_out = False

    def forward(self, x):
        f = self.drop(F.relu(self.bn(self.conv(x)))).flatten(1)
        logits = self.fc(f)
        return (f, logits) if self.tuple_out else logits


def torchattacks_pgd(model, x, y, eps, alpha, steps, start):
    """torchattacks' PGD loop (eval mode), with a given random start."""
    model.eval()
    adv = torch.clamp(x + start, 0, 1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        cost = nn.CrossEntropyLoss()(model(adv), y)
        grad = torch.autograd.grad(cost, adv)[0]
        adv = adv.detach() + alpha * grad.sign()
        delta = torch.clamp(adv - x, min=-eps, max=eps)
        adv = torch.clamp(x + delta, min=0, max=1).detach()
    return adv


def test_pgd_identical_to_torchattacks_loop():
    model = TinyNet()
    x, y = images(8), torch.randint(4, (8,))
    g = torch.Generator().manual_seed(3)
    ours = PGD(model, eps=8 / 255, alpha=2 / 255, steps=7, generator=g)(x, y)
    start = torch.empty_like(x).uniform_(-8 / 255, 8 / 255, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, torchattacks_pgd(model, x, y, 8 / 255, 2 / 255, 7, start))


@pytest.mark.parametrize("backend", ["torch", "cext"])
def test_pgd_keeps_a_channels_last_batch_and_matches_torchattacks_in_that_layout(backend):
    """--channels-last: the attack returns channels_last images, the torchattacks loop's to the bit."""
    if gacd_fast.backends.unavailable_reason(backend, torch.device("cpu")) is not None:
        pytest.skip(f"{backend} unavailable")
    model = TinyNet().to(memory_format=torch.channels_last)
    x, y = images(8).contiguous(memory_format=torch.channels_last), torch.randint(4, (8,))
    g = torch.Generator().manual_seed(3)
    ours = PGD(model, eps=8 / 255, alpha=2 / 255, steps=7, generator=g, backend=backend)(x, y)
    assert ours.is_contiguous(memory_format=torch.channels_last) and not ours.is_contiguous()
    start = torch.empty_like(x).uniform_(-8 / 255, 8 / 255, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, torchattacks_pgd(model, x, y, 8 / 255, 2 / 255, 7, start))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_in_ball_and_reproducible(norm):
    x = images(16)
    eps = 0.05 if norm == "linf" else 0.3
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = gacd_fast.pgd_random_start(x, eps=eps, norm=norm, generator=g())
    assert torch.equal(a, gacd_fast.pgd_random_start(x, eps=eps, norm=norm, generator=g()))
    assert a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
    dist = (a - x).abs().flatten(1).amax(1) if norm == "linf" else (a - x).flatten(1).norm(dim=1)
    assert (dist <= eps + 1e-6).all()
    per_sample = torch.linspace(0, 0.1, 16)
    b = gacd_fast.pgd_random_start(x, eps=per_sample, norm=norm)
    assert torch.equal(b[0], x[0])
    with pytest.raises(TypeError, match="generator"):
        gacd_fast.pgd_random_start(x, eps=0.1, generator=7)


def test_pgd_contract():
    model = TinyNet()
    model.train()
    model.bn.eval()  # a mixed-mode model: every module's flag must come back as it was
    flags = [m.training for m in model.modules()]
    for p in model.parameters():
        p.grad = None
    x, y = images(6), torch.randint(4, (6,))
    with torch.no_grad():  # works even when called under no_grad
        adv = PGD(model, eps=0.05, alpha=0.02, steps=5)(x, y)
    assert [m.training for m in model.modules()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert not adv.requires_grad and adv.dtype == x.dtype
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() <= 0.05 + 1e-6


def test_pgd_increases_loss_and_beats_fgsm_start():
    torch.manual_seed(0)
    model = TinyNet(dropout=False).eval()
    x, y = images(32), torch.randint(4, (32,))
    clean = F.cross_entropy(model(x), y)
    adv = PGD(model, eps=0.1, alpha=0.02, steps=10)(x, y)
    fgsm = FGSM(model, eps=0.1)(x, y)
    assert F.cross_entropy(model(adv), y) > clean
    assert F.cross_entropy(model(fgsm), y) > clean
    assert (fgsm - x).abs().max() <= 0.1 + 1e-6


def test_fgsm_matches_torchattacks():
    model = TinyNet(dropout=False).eval()
    x, y = images(8), torch.randint(4, (8,))
    xr = x.clone().requires_grad_()
    grad = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)[0]
    want = torch.clamp(x + 0.03 * grad.sign(), 0, 1)
    torch.testing.assert_close(FGSM(model, eps=0.03)(x, y), want, rtol=0, atol=1e-7)


def test_pgd_l2_inside_ball_and_steps_zero():
    model = TinyNet()
    x, y = images(6), torch.randint(4, (6,))
    adv = PGD(model, eps=0.5, alpha=0.2, steps=4, norm="l2")(x, y)
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert torch.equal(PGD(model, steps=0, random_start=False)(x, y), x)


def test_pgd_per_sample_eps_and_tuple_output_and_custom_loss():
    model = TinyNet()
    model.tuple_out = True
    x, y = images(4), torch.randint(4, (4,))
    eps = torch.tensor([0.0, 0.01, 0.05, 0.1])
    adv = PGD(model, eps=eps, alpha=0.01, steps=3)(x, y)
    assert ((adv - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    calls = []

    def feature_loss(out, targets):
        calls.append(targets)
        return out[0].pow(2).sum()

    adv2 = PGD(model, eps=0.05, alpha=0.01, steps=2, loss=feature_loss)(x, y)
    assert len(calls) == 2 and (adv2 - x).abs().max() <= 0.05 + 1e-6


def test_pgd_normalization():
    model = TinyNet(dropout=False).eval()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    x, y = images(4), torch.randint(4, (4,))
    adv = PGD(model, eps=0.03, alpha=0.01, steps=3, random_start=False, normalization=(mean, std))(x, y)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    wrapped = nn.Sequential()
    wrapped.forward = lambda z: model((z - m) / s)
    want = torchattacks_pgd(wrapped, x, y, 0.03, 0.01, 3, torch.zeros_like(x))
    assert torch.equal(adv, want)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(norm="l1"), ValueError, "norm"),
    (dict(loss="mse"), ValueError, "loss"),
    (dict(loss=3), TypeError, "loss"),
    (dict(model_mode="test"), ValueError, "model_mode"),
    (dict(normalization=([0.5], [0.0])), ValueError, "std"),
    (dict(normalization=([0.5, 0.5], [0.1])), ValueError, "same length"),
])
def test_pgd_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        PGD(TinyNet(), **kwargs)


@pytest.mark.parametrize("backend,exc,match", [
    ("fast", ValueError, r"unknown backend 'fast'; known backends: \["),
    (3, TypeError, "backend must be a str or None, got int"),
])
def test_attack_backend_is_checked_when_built_like_gacd_loss(backend, exc, match):
    """An unknown backend= is refused when the attack is built (it was stored unchecked and failed
    at the first step), with GACDLoss's error."""
    for build in (lambda: PGD(TinyNet(), backend=backend), lambda: FGSM(TinyNet(), backend=backend),
                  lambda: gacd_fast.GACDLoss(4, 4, num_data=10, backend=backend)):
        with pytest.raises(exc, match=match):
            build()
    assert PGD(TinyNet(), backend="auto").backend == "auto" and PGD(TinyNet()).backend is None


def test_pgd_bad_calls():
    atk = PGD(TinyNet(), steps=1)
    x, y = images(3), torch.randint(4, (3,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        atk(x * 3, y)
    with pytest.raises(ValueError, match="targets"):
        atk(x, y[:2])
    with pytest.raises(ValueError, match="eps"):
        PGD(TinyNet(), eps=torch.tensor([0.1, -0.1, 0.1]))(x, y)
    with pytest.raises(TypeError, match="model"):
        PGD(lambda z: z)
    odd = TinyNet()
    odd.forward = lambda z: {"logits": z}
    with pytest.raises(TypeError, match="logits"):
        PGD(odd, steps=1)(x, y)


# ------------------------------------------------------------------- targeted mode (torchattacks')
def _torchattacks():
    return pytest.importorskip("torchattacks")


TARGETED_MODES = {
    "label": lambda atk: atk.set_mode_targeted_by_label(),
    "function": lambda atk: atk.set_mode_targeted_by_function(lambda x, y: (y + 1) % 4),
    "random": lambda atk: atk.set_mode_targeted_random(),
    "least_likely": lambda atk: atk.set_mode_targeted_least_likely(),
    "least_likely_k2": lambda atk: atk.set_mode_targeted_least_likely(kth_min=2),
}


def _set_theirs(atk, mode):
    """torchattacks' call for the same mode (it prints unless quiet)."""
    if mode == "function":
        atk.set_mode_targeted_by_function(lambda x, y: (y + 1) % 4, quiet=True)
    elif mode.startswith("least_likely"):
        atk.set_mode_targeted_least_likely(kth_min=2 if mode.endswith("k2") else 1, quiet=True)
    else:
        getattr(atk, f"set_mode_targeted_{'by_label' if mode == 'label' else mode}")(quiet=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(TARGETED_MODES))
def test_targeted_pgd_bitwise_torchattacks(mode):
    ta = _torchattacks()
    torch.manual_seed(11)
    model = TinyNet().eval()
    x, y = images(16), torch.randint(4, (16,))
    theirs = ta.PGD(model, eps=8 / 255, alpha=2 / 255, steps=5)
    _set_theirs(theirs, mode)
    torch.manual_seed(5)  # both draw the random targets, then the random start, from the global RNG
    want = theirs(x, y)
    ours = TARGETED_MODES[mode](PGD(model, eps=8 / 255, alpha=2 / 255, steps=5))
    torch.manual_seed(5)
    got = ours(x, y)
    assert ours.targeted and ours.attack_mode == theirs.attack_mode
    assert torch.equal(got, want) and not torch.equal(got, x)


@pytest.mark.parametrize("mode", list(TARGETED_MODES))
def test_targeted_fgsm_bitwise_torchattacks(mode):
    ta = _torchattacks()
    torch.manual_seed(12)
    model = TinyNet().eval()
    x, y = images(16), torch.randint(4, (16,))
    theirs = ta.FGSM(model, eps=0.05)
    _set_theirs(theirs, mode)
    torch.manual_seed(6)
    want = theirs(x, y)
    ours = TARGETED_MODES[mode](FGSM(model, eps=0.05))
    torch.manual_seed(6)
    assert torch.equal(ours(x, y), want)


def test_untargeted_fgsm_bitwise_torchattacks():
    ta = _torchattacks()
    model = TinyNet().eval()
    x, y = images(16), torch.randint(4, (16,))
    assert torch.equal(FGSM(model, eps=0.05)(x, y), ta.FGSM(model, eps=0.05)(x, y))


def _recording_ce(seen):
    def loss(out, labels):
        seen.append(labels)
        return F.cross_entropy(out, labels)
    return loss


@pytest.mark.parametrize("mode", ["label", "random", "least_likely"])
def test_targeted_pgd_raises_the_target_probability(mode):
    torch.manual_seed(0)
    model = TinyNet(dropout=False).eval()
    x, y = images(32), torch.randint(4, (32,))
    seen = []
    atk = TARGETED_MODES[mode](PGD(model, eps=0.3, alpha=0.05, steps=10, loss=_recording_ce(seen)))
    call_targets = (y + 1) % 4 if mode == "label" else y
    adv = atk(x, call_targets)
    target = seen[0]
    assert target.dtype == torch.int64 and target.shape == y.shape and all(torch.equal(t, target) for t in seen)
    if mode == "label":
        assert torch.equal(target, call_targets)
    else:  # a class other than the true one
        assert (target != y).all() and target.min() >= 0 and target.max() < 4
    if mode == "least_likely":
        with torch.no_grad():
            assert torch.equal(target, model(x).masked_fill(F.one_hot(y, 4).bool(), float("inf")).argmin(1))
    with torch.no_grad():
        p_clean = F.softmax(model(x), 1).gather(1, target[:, None])
        p_adv = F.softmax(model(adv), 1).gather(1, target[:, None])
    assert (p_adv > p_clean).all() and p_adv.mean() > p_clean.mean() + 0.05, (p_clean.mean(), p_adv.mean())
    assert (adv - x).abs().max() <= 0.3 + 1e-6


def test_targeted_mode_with_a_custom_loss_minimises_it_on_the_target_labels():
    model = TinyNet(dropout=False).eval()
    x, y = images(8), torch.randint(4, (8,))
    tgt = (y + 2) % 4
    ce = PGD(model, eps=0.05, alpha=0.01, steps=3).set_mode_targeted_by_label()
    custom = PGD(model, eps=0.05, alpha=0.01, steps=3, loss=lambda out, t: F.cross_entropy(out, t))
    custom.set_mode_targeted_by_label()
    g = lambda: torch.Generator().manual_seed(2)  # noqa: E731
    ce.generator, custom.generator = g(), g()
    assert torch.equal(ce(x, tgt), custom(x, tgt))
    # a loss that ignores its targets (like GACD's guided objective) is descended: here ||f||^2
    feature_norm = lambda out, _t: out.pow(2).sum()  # noqa: E731
    down = PGD(model, eps=0.05, alpha=0.01, steps=5, random_start=False, loss=feature_norm)
    up_adv = down(x, y)
    down_adv = down.set_mode_targeted_by_label()(x, y)
    with torch.no_grad():
        assert model(down_adv).pow(2).sum() < model(x).pow(2).sum() < model(up_adv).pow(2).sum()


def test_set_mode_default_and_random_targets_from_the_generator():
    model = TinyNet(dropout=False).eval()
    x, y = images(8), torch.randint(4, (8,))
    atk = PGD(model, eps=0.05, alpha=0.01, steps=2, generator=torch.Generator().manual_seed(0))
    assert atk.attack_mode == "default" and not atk.targeted
    untargeted = atk(x, y)
    assert atk.set_mode_targeted_random() is atk and atk.attack_mode == "targeted(random)"
    seen = []
    rnd = PGD(model, eps=0.05, alpha=0.01, steps=1, loss=_recording_ce(seen)).set_mode_targeted_random()
    for seed in (0, 0, 1):
        rnd.generator = torch.Generator().manual_seed(seed)
        rnd(x, y)
    assert torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], seen[2])
    atk.set_mode_default()
    atk.generator = torch.Generator().manual_seed(0)
    assert not atk.targeted and torch.equal(atk(x, y), untargeted)


def test_targeted_attack_restores_model_mode_also_after_an_exception():
    model = TinyNet()
    model.train()
    model.bn.eval()
    flags = [m.training for m in model.modules()]
    x, y = images(4), torch.randint(4, (4,))
    for set_mode in TARGETED_MODES.values():
        set_mode(PGD(model, eps=0.05, alpha=0.02, steps=2, model_mode="train"))(x, y)
        assert [m.training for m in model.modules()] == flags

    def failing_target(images, targets):
        raise RuntimeError("target function failed")

    with pytest.raises(RuntimeError, match="target function failed"):
        PGD(model, steps=1).set_mode_targeted_by_function(failing_target)(x, y)
    assert [m.training for m in model.modules()] == flags

    def failing_loss(out, labels):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        PGD(model, steps=1, loss=failing_loss).set_mode_targeted_least_likely()(x, y)
    assert [m.training for m in model.modules()] == flags


def test_targeted_bad_arguments():
    atk = PGD(TinyNet(), steps=1)
    x, y = images(3), torch.randint(4, (3,))
    with pytest.raises(ValueError, match="kth_min must be >= 1, got 0"):
        atk.set_mode_targeted_least_likely(kth_min=0)
    with pytest.raises(TypeError, match="kth_min must be an int, got float"):
        atk.set_mode_targeted_least_likely(kth_min=1.5)
    with pytest.raises(ValueError, match=r"kth_min must be <= 3 \(the classes other than the true one\), got 4"):
        atk.set_mode_targeted_least_likely(kth_min=4)(x, y)
    with pytest.raises(TypeError, match="target_map_function must be callable"):
        atk.set_mode_targeted_by_function(3)
    with pytest.raises(IndexError, match=r"target labels must hold indices in \[0, 4\)"):
        atk.set_mode_targeted_by_label()(x, torch.tensor([0, 4, 1]))
    with pytest.raises(IndexError, match=r"target labels must hold indices in \[0, 4\)"):
        atk.set_mode_targeted_by_function(lambda x, y: y - 1)(x, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="target labels from target_map_function must be a tensor with 3 rows"):
        atk.set_mode_targeted_by_function(lambda x, y: y[:2])(x, y)
    with pytest.raises(TypeError, match="target labels from target_map_function must be a torch.Tensor, got list"):
        atk.set_mode_targeted_by_function(lambda x, y: y.tolist())(x, y)
    with pytest.raises(TypeError, match="targets must have dtype in"):
        atk.set_mode_targeted_random()(x, F.one_hot(y, 4).float())
    with pytest.raises(IndexError, match=r"targets must hold indices in \[0, 4\)"):
        atk.set_mode_targeted_least_likely()(x, torch.tensor([0, 1, 9]))
    odd = TinyNet()
    odd.forward = lambda z: {"logits": z}
    with pytest.raises(TypeError, match=r"attack mode 'targeted\(random\)' needs the model to return \[B, C\] logits"):
        PGD(odd, steps=1).set_mode_targeted_random()(x, y)
    one_class = nn.Sequential(nn.Flatten(), nn.Linear(3 * 7 * 9, 1))
    with pytest.raises(ValueError, match="needs at least 2 classes, the model has 1"):
        PGD(one_class, steps=1).set_mode_targeted_random()(x, torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="generator"):
        FGSM(TinyNet(), generator=1)


def test_attack_base_is_the_extension_point():
    with pytest.raises(TypeError, match="abstract"):
        gacd_fast.Attack(TinyNet(), 0.1)

    class RandomStartOnly(gacd_fast.Attack):
        def _perturb(self, x_nat, x_adv, labels, eps):
            return x_adv

    model = TinyNet()
    model.train()
    x, y = images(4), torch.randint(4, (4,))
    adv = RandomStartOnly(model, 0.05, random_start=True, generator=torch.Generator().manual_seed(1))(x, y)
    assert torch.equal(adv, gacd_fast.pgd_random_start(x, eps=0.05, generator=torch.Generator().manual_seed(1)))
    assert model.training


def test_parameters_stop_requiring_grad_only_during_the_attack():
    """The attack needs only the input's gradient: the parameters' flags are off while it runs and
    every flag comes back after, also after an exception; frozen ones stay frozen."""
    model = TinyNet(dropout=False)
    model.bn.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    seen = []

    def loss(out, targets):
        seen.append([p.requires_grad for p in model.parameters()])
        return F.cross_entropy(out, targets)

    x, y = images(4), torch.randint(4, (4,))
    PGD(model, eps=0.05, alpha=0.02, steps=2, loss=loss)(x, y)
    assert seen == [[False] * len(flags)] * 2
    assert [p.requires_grad for p in model.parameters()] == flags

    def failing(out, targets):
        raise RuntimeError("loss failed")

    with pytest.raises(RuntimeError, match="loss failed"):
        FGSM(model, loss=failing)(x, y)
    assert [p.requires_grad for p in model.parameters()] == flags
