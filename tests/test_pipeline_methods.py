"""Each training method runs a couple of tiny steps; the teacher stays frozen and in eval mode;
the method registry builds every registered method and refuses bad registrations."""
import copy
import math

import pytest
import torch

from gacd_fast.distill import config
from gacd_fast.distill.config import DistillConfig, TeacherConfig, resolve
from gacd_fast.distill.data import load_digits_split
from gacd_fast.distill.method_registry import (
    STUDENT_METHODS, TEACHER_METHODS, MethodInfo, build_method, demo_students, method_help, register_method,
)
from gacd_fast import PGD
from gacd_fast.attacks import logits_of
from gacd_fast.distill.data import ImageDataset
from gacd_fast.distill.methods import (
    GACD, IAD, RSLAD, AdaAD, AttackSpec, Distill, MethodInputs, _StudentTeacher, soft_label_kl,
)
from gacd_fast.distill.models import build_model
from gacd_fast.distill.train import fit, load_checkpoint, save_checkpoint

ATTACK = AttackSpec(eps=0.2, alpha=0.05, steps=2)


def build_student(method, teacher=None, student_dim=None, num_data=None, **options):
    """build_method for a student, with the digits defaults for every option not given."""
    return build_method("student", method, resolve(DistillConfig(**options)),
                        MethodInputs(ATTACK, teacher, student_dim, num_data))


@pytest.fixture(scope="module")
def tiny():
    tr, te = load_digits_split()
    return tr.subset(48), te.subset(24)


@pytest.mark.parametrize("method", list(TEACHER_METHODS))
def test_teacher_methods(tiny, method):
    tr, te = tiny
    m = build_model("small_cnn_teacher", 10, 1)
    obj = build_method("teacher", method, resolve(TeacherConfig()), MethodInputs(ATTACK))
    hist = fit(m, obj, tr, epochs=1, batch_size=24, lr=0.05,
               device=torch.device("cpu"), test=te, log=lambda s: None)
    assert len(hist) == 1 and hist[0]["loss"] > 0 and 0 <= hist[0]["test_acc"] <= 1


@pytest.mark.parametrize("method", list(STUDENT_METHODS))
def test_student_methods(tiny, method):
    tr, _ = tiny
    teacher = build_model("small_cnn_teacher", 10, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("small_cnn_student", 10, 1)
    obj = build_student(method, teacher, student.feature_dim, len(tr), num_negatives=16, ard_kl_reduction="batchmean")
    w0 = student.fc.weight.detach().clone()
    conv0 = student.body[0][0].weight.detach().clone()
    fit(student, obj, tr, epochs=1, batch_size=24, lr=0.05, device=torch.device("cpu"), log=lambda s: None)
    assert not torch.equal(conv0, student.body[0][0].weight)  # the student learned
    # the feature-only student never sees a label: its classifier gets no gradient
    assert torch.equal(w0, student.fc.weight) == (method == "gacd_feature")
    assert isinstance(obj, Distill) == STUDENT_METHODS[method].needs_teacher
    if STUDENT_METHODS[method].needs_teacher:
        assert not teacher.training  # frozen and in eval mode (BN statistics unchanged)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    if method.startswith("gacd"):
        assert obj.criterion.weighting == ("none" if method in ("gacd_noweight", "gacd_feature") else "confidence")
        assert all(not p.requires_grad for p in teacher.parameters())
        assert not any(p is q for p in obj.parameters() for q in teacher.parameters())


def test_gacd_guided_attack_and_clean_ce(tiny):
    tr, _ = tiny
    teacher = build_model("small_cnn_teacher", 10, 1)
    student = build_model("small_cnn_student", 10, 1)
    obj = build_student("gacd", teacher, student.feature_dim, len(tr), num_negatives=8, attack_objective="guided",
                  ce_input="clean")
    assert isinstance(obj, GACD)
    rows0 = obj.criterion.bank_t.rows.clone()
    x, y = tr.batch(torch.arange(12)), tr.labels[:12]
    out = obj.step(student, x, y, torch.arange(12))
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.parts) == {"ce", "gacd"}
    changed = (obj.criterion.bank_t.rows != rows0).any(1)
    assert changed[:12].all() and not changed[12:].any()  # only the batch's rows; the attack never updates


def test_method_errors():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_student("ard")
    with pytest.raises(ValueError, match="student method must be one of"):
        build_student("crd")
    with pytest.raises(ValueError, match="teacher method"):
        build_method("teacher", "natural", resolve(TeacherConfig()), MethodInputs(ATTACK))
    with pytest.raises(ValueError, match="student method must be one of"):
        build_student("pgd_at")  # the old name: now "at"
    with pytest.raises(ValueError, match="needs MethodInputs.student_dim"):
        build_student("gacd", build_model("small_cnn_teacher", 10, 1))
    with pytest.raises(ValueError, match="role must be one of"):
        build_method("critic", "at", resolve(TeacherConfig()), MethodInputs(ATTACK))
    assert tuple(STUDENT_METHODS) == ("natural", "at", "ard", "rslad", "iad", "adaad", "gacd", "gacd_noweight",
                                      "gacd_guided", "gacd_feature")
    assert tuple(TEACHER_METHODS) == ("at", "trades")


def test_registry_drives_the_options():
    """The CLI's method choices and help are the registry's; a registration is checked."""
    assert list(config.STUDENT_CHOICES) == list(STUDENT_METHODS) and list(config.TEACHER_METHOD_CHOICES) == ["at", "trades"]
    # the demo keeps its few minutes: the newer baselines run in the study (whose default is every student)
    assert config.DemoConfig().methods == demo_students() == ["natural", "at", "ard", "gacd", "gacd_noweight",
                                                              "gacd_feature"]
    assert config.StudyConfig().methods == list(STUDENT_METHODS)
    helps = {f.name: f.metadata["help"] for f in config.dataclasses.fields(DistillConfig)}
    assert helps["method"] == method_help("student") and "gacd_noweight (GACD with weighting=none" in helps["method"]
    assert helps["teacher"].endswith("needed by ard, rslad, iad, adaad, gacd, gacd_noweight, gacd_guided, gacd_feature")
    # the registry holds each class's factory itself
    assert STUDENT_METHODS["rslad"].factory == RSLAD.from_config and STUDENT_METHODS["adaad"].factory == AdaAD.from_config
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodInfo("gacd", "student", "again", GACD.from_config))
    with pytest.raises(TypeError, match="factory must be callable"):
        register_method(MethodInfo("new", "student", "x", "gacd_fast.distill.methods:GACD.from_config"))
    with pytest.raises(ValueError, match="role must be one of"):
        register_method(MethodInfo("new", "critic", "x", GACD.from_config))
    with pytest.raises(TypeError, match="expects a MethodInfo"):
        register_method(("new", "student"))


def test_a_registered_method_is_accepted_everywhere(monkeypatch):
    """One registration: the options accept the name and build_method builds it (variant options applied)."""
    monkeypatch.setitem(STUDENT_METHODS, "gacd_queue", MethodInfo(
        "gacd_queue", "student", "GACD with a MoCo queue", GACD.from_config,
        options={"bank": "queue"}, needs_teacher=True, uses_bank=True))
    cfg = config.validate(resolve(DistillConfig(method="gacd_queue", num_negatives=16)))
    teacher = build_model("small_cnn_teacher", 10, 1)
    student_dim = build_model("small_cnn_student", 10, 1).feature_dim
    obj = build_method("student", cfg.method, cfg, MethodInputs(ATTACK, teacher, student_dim, 48))
    assert isinstance(obj, GACD) and type(obj.criterion.bank_t).__name__ == "FeatureQueue"
    assert cfg.bank == "memory"  # the variant's options are set on a copy, never on the caller's config


def test_checkpoint_roundtrip(tmp_path):
    m = build_model("small_cnn_student", 10, 1).eval()
    path = str(tmp_path / "s.pt")
    save_checkpoint(path, m, arch="small_cnn_student", num_classes=10, in_channels=1, role="student",
                    method="natural", config={"a": 1})
    m2, meta = load_checkpoint(path)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(m(x)[1], m2(x)[1]) and meta["config"] == {"a": 1} and not m2.training
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "none.pt"))


def test_feature_only_gacd_uses_no_labels(tiny):
    """gacd_feature: the same step with shuffled labels gives the same loss (guided attack, no CE, no weights)."""
    tr, _ = tiny
    teacher = build_model("small_cnn_teacher", 10, 1)
    student = build_model("small_cnn_student", 10, 1)
    obj = build_student("gacd_feature", teacher, student.feature_dim, len(tr), num_negatives=16)
    assert obj.attack_objective == "guided" and obj.ce_weight == 0
    x, y, idx = tr.batch(torch.arange(8)), tr.labels[:8], torch.arange(8)
    losses = []
    for labels in (y, (y + 3) % 10):
        torch.manual_seed(0)  # fresh copies: a step updates BatchNorm's statistics and the bank
        losses.append(copy.deepcopy(obj).step(copy.deepcopy(student), x, labels, idx).loss.item())
    assert losses[0] == losses[1]


def test_gacd_prefill_writes_the_teacher_embeddings(tiny):
    """fit() calls prepare(): the memory starts as the teacher's exact embeddings of the training set."""
    tr, _ = tiny
    teacher = build_model("small_cnn_teacher", 10, 1).eval()
    student = build_model("small_cnn_student", 10, 1)
    obj = build_student("gacd", teacher, student.feature_dim, len(tr), num_negatives=16)
    obj.prepare(tr, "cpu")
    with torch.no_grad():
        want = obj.criterion.embed_t(teacher(tr.batch(torch.arange(len(tr))))[0])
    torch.testing.assert_close(obj.criterion.bank_t.rows, want)


# ------------------------------------------------------------------ RSLAD, IAD, AdaAD: losses by hand
# p = softmax([0, ln 3]) = (1/4, 3/4); q = softmax([0, 0]) = (1/2, 1/2); r = softmax([ln 9, 0]) = (9/10, 1/10)
P, Q, R = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(9), 0.0]])
KL_PQ = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(p || q) = 0.1308
KL_PR = 0.25 * math.log(0.25 / 0.9) + 0.75 * math.log(0.75 / 0.1)  # KL(p || r) = 1.1909
KL_RQ = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)      # KL(r || q) = 0.3681
FROZEN = build_model("small_cnn_teacher", 10, 1)


def test_rslad_loss_by_hand():
    """5/6 KL(T(x) || S(x')) + 1/6 KL(T(x) || S(x)), KL averaged over B x C ('mean') or per sample."""
    loss, parts = RSLAD(FROZEN, ATTACK, kl_reduction="mean").objective(Q, R, P)  # S(x') = q, S(x) = r, T(x) = p
    assert loss.item() == pytest.approx(5 / 6 * KL_PQ / 2 + 1 / 6 * KL_PR / 2, rel=1e-6)
    assert parts == pytest.approx({"kl_adv": KL_PQ / 2, "kl_nat": KL_PR / 2}, rel=1e-6)
    loss, _ = RSLAD(FROZEN, ATTACK, adv_weight=0.5, kl_reduction="batchmean").objective(Q, R, P)
    assert loss.item() == pytest.approx(0.5 * KL_PQ + 0.5 * KL_PR, rel=1e-6)


def test_iad_loss_by_hand():
    """alpha tau^2 KL(T(x) || S(x')) + alpha (1 - P_T(y|x')^beta) KL(S(x) || S(x')) + (1 - alpha) CE(S(x), y)."""
    y = torch.tensor([1])
    iad = IAD(FROZEN, ATTACK, alpha=0.5, beta=0.1)
    # S(x') = q, S(x) = r, T(x) = p, T(x') = p: the teacher gives the true class 3/4 there
    loss, parts = iad.objective(Q, R, P, P, y)
    want = 0.5 * KL_PQ + 0.5 * (1 - 0.75 ** 0.1) * KL_RQ + 0.5 * -math.log(0.1)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert parts == pytest.approx({"kl_teacher": KL_PQ, "introspection": (1 - 0.75 ** 0.1) * KL_RQ}, rel=1e-6)
    loss, parts = iad.objective(Q, R, P, None, y)  # before the introspection starts
    assert loss.item() == pytest.approx(0.5 * KL_PQ + 0.5 * -math.log(0.1), rel=1e-6) and "introspection" not in parts
    # temperature: tau^2 KL at tau; a teacher sure of the true class at x' (P_T = 1) leaves no introspection
    sure = torch.tensor([[-50.0, 50.0]])
    loss, _ = IAD(FROZEN, ATTACK, temperature=2.0).objective(Q, R, P * 2, sure, y)  # T(x)/2 = softmax([0, ln 3])
    assert loss.item() == pytest.approx(4 * KL_PQ, rel=1e-6)


def test_adaad_loss_by_hand():
    """alpha KL(T(x') || S(x')) + (1 - alpha) KL(T(x) || S(x)), element-wise mean (AdaAD main.py)."""
    loss, parts = AdaAD(FROZEN, ATTACK).objective(Q, P)  # S(x') = q, T(x') = p; alpha 1
    assert loss.item() == pytest.approx(KL_PQ / 2, rel=1e-6) and set(parts) == {"kl_adv"}
    loss, _ = AdaAD(FROZEN, ATTACK, alpha=0.25, kl_reduction="batchmean").objective(Q, P, R, P)
    assert loss.item() == pytest.approx(0.25 * KL_PQ + 0.75 * KL_PR, rel=1e-6)


@pytest.mark.parametrize("method", ["rslad", "adaad"])
def test_soft_label_attacks_use_no_labels(tiny, method):
    """RSLAD's and AdaAD's attacks and losses read no hard label: shuffled labels, the same step."""
    tr, _ = tiny
    teacher = build_model("small_cnn_teacher", 10, 1)
    student = build_model("small_cnn_student", 10, 1)
    obj = build_student(method, teacher, student.feature_dim, len(tr))
    x, y, idx = tr.batch(torch.arange(8)), tr.labels[:8], torch.arange(8)
    losses = [copy.deepcopy(obj).step(copy.deepcopy(student), x, labels, idx).loss.item() for labels in (y, (y + 3) % 10)]
    assert losses[0] == losses[1]


def test_adaad_attack_differentiates_through_the_teacher(tiny):
    """AdaAD's attack moves x' where student and teacher disagree most, the teacher seeing x' too:
    the divergence at x' exceeds that at x, and its input gradient includes the teacher's part."""
    tr, _ = tiny
    torch.manual_seed(0)
    teacher, student = build_model("small_cnn_teacher", 10, 1).eval(), build_model("small_cnn_student", 10, 1).eval()
    obj = build_student("adaad", teacher, student.feature_dim, len(tr))
    x = tr.batch(torch.arange(16)).requires_grad_(True)
    s_logits, t_logits = _StudentTeacher(student, teacher)(x)
    both = torch.autograd.grad(soft_label_kl(s_logits, t_logits, reduction="sum"), x)[0]
    student_only = torch.autograd.grad(soft_label_kl(student(x)[1], t_logits.detach(), reduction="sum"), x)[0]
    assert not torch.allclose(both, student_only)
    out = obj.step(student, x.detach(), tr.labels[:16], torch.arange(16))
    with torch.no_grad():
        at_x = soft_label_kl(student(x)[1], teacher(x)[1], reduction="mean")
    assert out.parts["kl_adv"] > at_x.item()


def test_iad_introspection_starts_after_begin_and_resumes(tiny):
    """The introspection term starts after round(iad_begin x epochs) epochs of steps; the step count
    is state (a resumed run continues the schedule)."""
    tr, _ = tiny
    teacher, student = build_model("small_cnn_teacher", 10, 1), build_model("small_cnn_student", 10, 1)
    obj = build_student("iad", teacher, student.feature_dim, len(tr), epochs=10, batch_size=24, iad_begin=0.1)
    assert obj.begin_steps == 2  # 1 epoch of ceil(48 / 24) steps
    x, y, idx = tr.batch(torch.arange(24)), tr.labels[:24], torch.arange(24)
    seen = [set(obj.step(student, x, y, idx).parts) for _ in range(3)]
    assert seen == [{"kl_teacher"}, {"kl_teacher"}, {"kl_teacher", "introspection"}]
    again = build_student("iad", teacher, student.feature_dim, len(tr), epochs=10, batch_size=24, iad_begin=0.1)
    again.load_state_dict(obj.state_dict())
    assert int(again.steps_done) == 3 and "introspection" in again.step(student, x, y, idx).parts


class Toy(torch.nn.Module):
    """A small MLP student for 1x4x4 images: (features [B, 16], logits [B, 4])."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 16), torch.nn.ReLU())
        self.fc = torch.nn.Linear(16, 4)
        self.feature_dim = 16

    def forward(self, x):
        f = self.body(x)
        return f, self.fc(f)


class PrototypeTeacher(torch.nn.Module):
    """A robust teacher for the toy task: logits = 10 (x - 1/2) . (prototype - 1/2) per class."""

    def __init__(self, prototypes):
        super().__init__()
        self.register_buffer("w", 10 * (prototypes.flatten(1) - 0.5))
        self.feature_dim = 16

    def forward(self, x):
        f = x.flatten(1) - 0.5
        return f, f @ self.w.T


def toy_task(n, seed):
    """4 classes of 1x4x4 images: a binary prototype (pixels 0.2 / 0.8) per class plus U(-0.1, 0.1) noise."""
    g = torch.Generator().manual_seed(0)
    protos = 0.2 + 0.6 * (torch.rand(4, 1, 4, 4, generator=g) > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (protos[y] + 0.2 * torch.rand(n, 1, 4, 4, generator=g) - 0.1).clamp(0, 1)
    return protos, ImageDataset(x, y, 4, "toy")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rslad", "iad", "adaad"])
def test_new_baselines_learn_a_tiny_task(method):
    """Each of the newer baselines teaches a student robustness on a toy task, from a robust teacher
    alone for RSLAD and AdaAD (no hard label): held-out clean accuracy, and PGD accuracy well above
    a naturally trained student's."""
    protos, train = toy_task(96, 1)
    _, test = toy_task(200, 2)
    eps = 0.2
    x, y = test.batch(torch.arange(len(test))), test.labels

    def train_and_attack(name):
        student = Toy()
        obj = build_method("student", name, resolve(DistillConfig(epochs=12, batch_size=16, iad_begin=0.25)),
                           MethodInputs(AttackSpec(eps, eps / 3, 3), PrototypeTeacher(protos), 16, len(train)))
        hist = fit(student, obj, train, epochs=12, batch_size=16, lr=0.1, device=torch.device("cpu"), log=lambda s: None)
        x_adv = PGD(student, eps, eps / 4, 10, generator=torch.Generator().manual_seed(0))(x, y)
        with torch.no_grad():
            accs = [(logits_of(student(z)).argmax(1) == y).float().mean().item() for z in (x, x_adv)]
        return hist, accs

    hist, (clean, robust) = train_and_attack(method)
    _, (_, natural_robust) = train_and_attack("natural")
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
    assert clean >= 0.95 and robust >= natural_robust + 0.2, (clean, robust, natural_robust)
