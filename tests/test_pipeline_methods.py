"""Each training method runs a couple of tiny steps; the teacher stays frozen and in eval mode."""
import pytest
import torch

from gacd_fast.distill.data import load_digits_split
from gacd_fast.distill.methods import (
    GACD,
    STUDENT_METHODS,
    AttackSpec,
    build_student_method,
    build_teacher_method,
)
from gacd_fast.distill.models import build_model
from gacd_fast.distill.train import fit, load_checkpoint, save_checkpoint

ATTACK = AttackSpec(eps=0.2, alpha=0.05, steps=2)


@pytest.fixture(scope="module")
def tiny():
    tr, te = load_digits_split()
    return tr.subset(48), te.subset(24)


@pytest.mark.parametrize("method", ["at", "trades"])
def test_teacher_methods(tiny, method):
    tr, te = tiny
    m = build_model("small_cnn_teacher", 10, 1)
    hist = fit(m, build_teacher_method(method, ATTACK), tr, epochs=1, batch_size=24, lr=0.05,
               device=torch.device("cpu"), test=te, log=lambda s: None)
    assert len(hist) == 1 and hist[0]["loss"] > 0 and 0 <= hist[0]["test_acc"] <= 1


@pytest.mark.parametrize("method", STUDENT_METHODS)
def test_student_methods(tiny, method):
    tr, _ = tiny
    teacher = build_model("small_cnn_teacher", 10, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_model("small_cnn_student", 10, 1)
    obj = build_student_method(method, ATTACK, teacher=teacher, student_dim=student.feature_dim, num_data=len(tr),
                               num_negatives=16, ard_kl_reduction="batchmean")
    w0 = student.fc.weight.detach().clone()
    fit(student, obj, tr, epochs=1, batch_size=24, lr=0.05, device=torch.device("cpu"), log=lambda s: None)
    assert not torch.equal(w0, student.fc.weight)  # the student learned
    if obj.needs_teacher:
        assert not teacher.training  # frozen and in eval mode (BN statistics unchanged)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    if method.startswith("gacd"):
        assert obj.criterion.weighting == ("none" if method == "gacd_noweight" else "confidence")
        assert all(not p.requires_grad for p in teacher.parameters())
        assert not any(p is q for p in obj.parameters() for q in teacher.parameters())


def test_gacd_guided_attack_and_clean_ce(tiny):
    tr, _ = tiny
    teacher = build_model("small_cnn_teacher", 10, 1)
    student = build_model("small_cnn_student", 10, 1)
    obj = build_student_method("gacd", ATTACK, teacher=teacher, student_dim=student.feature_dim, num_data=len(tr),
                               num_negatives=8, attack_objective="guided", ce_input="clean")
    assert isinstance(obj, GACD)
    rows0 = obj.criterion.memory_t.rows.clone()
    x, y = tr.batch(torch.arange(12)), tr.labels[:12]
    out = obj.step(student, x, y, torch.arange(12))
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.parts) == {"ce", "gacd"}
    changed = (obj.criterion.memory_t.rows != rows0).any(1)
    assert changed[:12].all() and not changed[12:].any()  # only the batch's rows; the attack never updates


def test_method_errors():
    with pytest.raises(ValueError, match="needs a teacher"):
        build_student_method("ard", ATTACK)
    with pytest.raises(ValueError, match="student method must be one of"):
        build_student_method("crd", ATTACK)
    with pytest.raises(ValueError, match="teacher method"):
        build_teacher_method("natural", ATTACK)
    with pytest.raises(ValueError, match="student method must be one of"):
        build_student_method("pgd_at", ATTACK)  # the old name: now "at"
    assert STUDENT_METHODS == ("natural", "at", "ard", "gacd", "gacd_noweight")


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
