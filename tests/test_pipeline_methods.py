"""Each training method runs a couple of tiny steps; the teacher stays frozen and in eval mode;
the method registry builds every registered method and refuses bad registrations."""
import copy
import os
import subprocess
import sys

import pytest
import torch

from gacd_fast.distill import config
from gacd_fast.distill.config import DistillConfig, TeacherConfig, resolve
from gacd_fast.distill.data import load_digits_split
from gacd_fast.distill.method_registry import STUDENT_METHODS, TEACHER_METHODS, MethodInfo, method_help, register_method
from gacd_fast.distill.methods import GACD, AttackSpec, Distill, MethodInputs, build_method
from gacd_fast.distill.models import build_model
from gacd_fast.distill.train import fit, load_checkpoint, save_checkpoint

ATTACK = AttackSpec(eps=0.2, alpha=0.05, steps=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert tuple(STUDENT_METHODS) == ("natural", "at", "ard", "gacd", "gacd_noweight", "gacd_feature")
    assert tuple(TEACHER_METHODS) == ("at", "trades")


def test_registry_drives_the_options():
    """The CLI's method choices and help are the registry's; a registration is checked."""
    assert list(config.STUDENT_CHOICES) == list(STUDENT_METHODS) and list(config.TEACHER_METHOD_CHOICES) == ["at", "trades"]
    assert config.DemoConfig().methods == list(STUDENT_METHODS)
    helps = {f.name: f.metadata["help"] for f in config.dataclasses.fields(DistillConfig)}
    assert helps["method"] == method_help("student") and "gacd_noweight (GACD with weighting=none" in helps["method"]
    assert helps["teacher"].endswith("needed by ard, gacd, gacd_noweight, gacd_feature")
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodInfo("gacd", "student", "again", "gacd_fast.distill.methods:GACD.from_config"))
    with pytest.raises(ValueError, match="'module:qualname'"):
        register_method(MethodInfo("new", "student", "x", "gacd_fast.distill.methods.GACD"))
    with pytest.raises(ValueError, match="role must be one of"):
        register_method(MethodInfo("new", "critic", "x", "m:f"))
    with pytest.raises(TypeError, match="expects a MethodInfo"):
        register_method(("new", "student"))


def test_a_registered_method_is_accepted_everywhere(monkeypatch):
    """One registration: the options accept the name and build_method builds it (variant options applied)."""
    monkeypatch.setitem(STUDENT_METHODS, "gacd_queue", MethodInfo(
        "gacd_queue", "student", "GACD with a MoCo queue", "gacd_fast.distill.methods:GACD.from_config",
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


def test_option_layer_imports_no_torch():
    """config and method_registry (all that option parsing reads) import no torch themselves; the
    package __init__s, which do, are stubbed out here."""
    code = ("import sys, types\n"
            "for name in ('gacd_fast', 'gacd_fast.distill'):\n"
            "    m = types.ModuleType(name); m.__path__ = [name.replace('.', '/')]; sys.modules[name] = m\n"
            "import gacd_fast.distill.config\n"
            "assert 'torch' not in sys.modules and 'gacd_fast.distill.method_registry' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
