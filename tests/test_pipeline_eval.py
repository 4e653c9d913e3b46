"""Evaluation metrics on toy models, CKA properties, reports and config round trips."""
import json
import math
import os

import pytest
import torch
from torch import nn

from gacd_fast.distill.cka import linear_cka
from gacd_fast.distill.config import (
    ConfigError,
    DemoConfig,
    DistillConfig,
    EvaluateConfig,
    TeacherConfig,
    from_dict,
    load_config,
    resolve,
    save_config,
)
from gacd_fast.distill.data import ImageDataset, load_digits_split, load_mnist5k_split, load_transfer
from gacd_fast.distill.evaluate import cw_margin, eps_grid, eps_sweep, evaluate_models, linear_probe, robust_accuracy
from gacd_fast.distill.report import format_table, write_results
from gacd_fast.distill.structure import knn_agreement


class Constant(nn.Module):
    """Ignores its input: every attack leaves its accuracy unchanged."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([3.0, 0.0]))

    def forward(self, x):
        f = x.flatten(1)
        return f, self.w.expand(x.shape[0], 2) + 0 * f.sum(1, keepdim=True)


class Threshold(nn.Module):
    """Class 1 iff mean pixel > 0.5 (steep): attackable within eps of the threshold only."""

    def forward(self, x):
        m = x.flatten(1).mean(1, keepdim=True)
        return m, torch.cat([torch.zeros_like(m), 100 * (m - 0.5)], 1)


def toy_data(values, labels):
    x = torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    return ImageDataset(x, torch.tensor(labels), 2, "toy")


def test_attacks_on_toy_models():
    data = toy_data([0.1, 0.45, 0.55, 0.9], [0, 0, 1, 1])
    acc = robust_accuracy(Threshold(), data, eps=0.1, alpha=0.03, pgd_steps=5, cw_steps=5)
    assert acc["clean"] == 1.0
    assert acc["fgsm"] == acc["pgd5"] == acc["cw"] == 0.5  # only the two points within eps of 0.5 flip
    const = robust_accuracy(Constant(), data, eps=0.3, alpha=0.1, pgd_steps=3, cw_steps=3)
    assert set(const.values()) == {0.5}


def test_cw_margin():
    z = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]])
    assert torch.allclose(cw_margin(z, torch.tensor([0, 2])), torch.tensor(((1 - 2) + (3 - 1)) / 2))
    assert torch.allclose(cw_margin((None, z), torch.tensor([0, 2])), cw_margin(z, torch.tensor([0, 2])))


def test_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    y = torch.randn(50, 5, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    assert math.isclose(linear_cka(x, x), 1.0, rel_tol=1e-9)
    assert math.isclose(linear_cka(x @ q, y), linear_cka(x, y), rel_tol=1e-9)  # orthogonal transform
    assert math.isclose(linear_cka(3.7 * x, y), linear_cka(x, y), rel_tol=1e-9)  # isotropic scale
    assert math.isclose(linear_cka(x + 5.0, y), linear_cka(x, y), rel_tol=1e-9)  # centring
    assert 0.0 <= linear_cka(x, y) < 0.5
    assert linear_cka(torch.ones(10, 3), y[:10]) == 0.0
    with pytest.raises(ValueError, match="same N"):
        linear_cka(x, y[:10])


def test_probe_and_evaluate_models(tmp_path):
    data = toy_data([0.1, 0.2, 0.3, 0.7, 0.8, 0.9] * 4, [0, 0, 0, 1, 1, 1] * 4)
    probe = linear_probe(Threshold(), data, data, epochs=50, eps=0.05, alpha=0.02, pgd_steps=3)
    assert probe["transfer_clean"] == 1.0 and set(probe) == {"transfer_clean", "transfer_pgd3"}
    rows = evaluate_models({"teacher": Threshold(), "const": Constant()}, data, teacher=Threshold(), eps=0.05,
                           alpha=0.02, pgd_steps=3, cw_steps=3, transfer=(data, data), probe_epochs=5,
                           log=lambda s: None)
    assert rows[0]["cka"] == pytest.approx(1.0) and rows[1]["clean"] == 0.5
    table = format_table(rows, "toy")
    assert "teacher" in table and "cka" in table and "100.00" in table
    sweep = {"eps": eps_grid(0.05, 3), "attack": "pgd3", "accuracy": eps_sweep({"teacher": Threshold()}, data, eps_grid(0.05, 3), steps=3)}
    hist = {"teacher": [{"epoch": 1, "loss": 1.0, "train_acc": 0.5}, {"epoch": 2, "loss": 0.5, "train_acc": 0.75}], "const": []}
    paths = write_results(rows, str(tmp_path), dataset="toy", eps=0.05, device="cpu", config={"a": 1}, title="toy",
                          sweep=sweep, histories=hist)
    assert set(paths) == {"json", "csv", "png", "curves", "robust_vs_eps", "training_curves"}
    assert all(os.path.getsize(p) > 0 for p in paths.values())
    doc = json.load(open(paths["json"]))
    assert list(doc["methods"]) == ["teacher", "const"] and doc["config"] == {"a": 1} and doc["dataset"] == "toy"
    assert doc["methods"]["teacher"]["seconds"] is None and doc["methods"]["const"]["cka"] == pytest.approx(rows[1]["cka"])
    for key in ("png", "robust_vs_eps", "training_curves"):
        assert open(paths[key], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # atomic writes leave no temporaries
    assert json.load(open(paths["curves"]))["eps_sweep"]["accuracy"]["teacher"] == sweep["accuracy"]["teacher"]


def test_eps_sweep():
    assert eps_grid(0.2, 5) == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3])
    assert eps_grid(0.2, 0) == [] and eps_grid(0.2, 1) == [0.2]
    data = toy_data([0.1, 0.45, 0.55, 0.9], [0, 0, 1, 1])
    acc = eps_sweep({"thr": Threshold(), "const": Constant()}, data, [0.0, 0.1, 0.5], steps=5)
    assert acc["thr"] == [1.0, 0.5, 0.0] and acc["const"] == [0.5, 0.5, 0.5]  # monotone in eps


@pytest.mark.parametrize("ext", ["yaml", "json"])
@pytest.mark.parametrize("cls", [TeacherConfig, DistillConfig, EvaluateConfig, DemoConfig])
def test_config_roundtrip(tmp_path, ext, cls):
    cfg = cls(seed=3, out_dir=str(tmp_path / "o"), train_limit=10)
    if cls is DistillConfig:
        cfg.lr_milestones = [0.3, 0.9]
        cfg.weighting = "correct"
    path = str(tmp_path / f"c.{ext}")
    save_config(cfg, path)
    assert load_config(cls, path) == cfg


def test_config_errors_and_resolve(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"no_such_option": 1}))
    with pytest.raises(ValueError, match="no_such_option"):
        load_config(TeacherConfig, str(p))
    cifar = resolve(DistillConfig(dataset="cifar10"))
    assert cifar.eps == pytest.approx(8 / 255) and cifar.alpha == pytest.approx(2 / 255) and cifar.attack_steps == 10
    assert (cifar.lr, cifar.weight_decay, cifar.num_negatives, cifar.student) == (0.1, 2e-4, 16384, "resnet18")
    assert (cifar.embed_dim, cifar.nce_temperature, cifar.nce_momentum, cifar.ard_temperature) == (128, 0.07, 0.5, 30.0)
    assert resolve(TeacherConfig(dataset="cifar10")).model == "wrn_34_10"
    d = resolve(EvaluateConfig(eps=0.3))
    assert d.alpha == pytest.approx(0.075) and d.transfer == "mnist5k-8"
    assert resolve(EvaluateConfig(dataset="mnist5k")).transfer == "digits-28"
    with pytest.raises(ConfigError, match="'dataset': unknown value 'mnist'"):
        resolve(TeacherConfig(dataset="mnist"))


@pytest.mark.parametrize("cls,data,match", [
    (TeacherConfig, {"epochs": "ten"}, "'epochs' must be int, got 'ten'"),
    (TeacherConfig, {"epochs": 2.5}, "'epochs' must be int"),
    (TeacherConfig, {"epochs": True}, "'epochs' must be int"),
    (TeacherConfig, {"epochs": 0}, "'epochs' must be >= 1"),
    (TeacherConfig, {"lr": -0.1}, "'lr' must be > 0"),
    (TeacherConfig, {"lr_milestones": [0.5, "x"]}, "'lr_milestones' must be a list of float|'lr_milestones' must be float"),
    (TeacherConfig, {"lr_milestones": 0.5}, "'lr_milestones' must be a list"),
    (TeacherConfig, {"method": "pgd_at"}, "'method': unknown value 'pgd_at'"),
    (TeacherConfig, {"resume": "yes"}, "'resume' must be bool"),
    (DistillConfig, {"method": "gacd_noreweight"}, "unknown value 'gacd_noreweight'"),
    (DistillConfig, {"student": "vgg"}, "'student': unknown value 'vgg'"),
    (DemoConfig, {"methods": ["natural", "crd"]}, "'methods': unknown value 'crd'"),
    (DemoConfig, {"methods": []}, "at least one"),
    (EvaluateConfig, {"dataset": "mnist"}, "'dataset': unknown value 'mnist'"),
    (EvaluateConfig, {"checkpoints": "a.pt"}, "'checkpoints' must be a list of str"),
])
def test_config_validation(cls, data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(cls, data)


def test_config_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TeacherConfig, str(p))
    p = tmp_path / "c.json"
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TeacherConfig, str(p))
    p.write_text('{"out": "x", "epochs": 3}')  # the CLI's name of out_dir is accepted too
    assert load_config(TeacherConfig, str(p)) == TeacherConfig(out_dir="x", epochs=3)


def test_autoattack_accuracy_on_a_tiny_model():
    """evaluate --autoattack N: torchattacks' AutoAttack (standard) on the first N of a seeded permutation."""
    from torch import nn

    from gacd_fast.distill.data import load_digits_split
    from gacd_fast.distill.evaluate import autoattack_accuracy

    torch.manual_seed(0)
    _, te = load_digits_split()

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(64, 16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            h = torch.relu(self.f(x.flatten(1)))
            return h, self.fc(h)

    model = Tiny().eval()
    acc, n = autoattack_accuracy(model, te, eps=0.3, n=6, seed=0)
    assert n == 6 and 0.0 <= acc <= 1.0
    clean = float((model(te.subset(6, 0).batch(torch.arange(6)))[1].argmax(1) == te.subset(6, 0).labels).float().mean())
    assert acc <= clean  # an attack never helps


def test_knn_agreement():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert knn_agreement(x, x) == 1.0 and knn_agreement(x, 2.5 * x @ q) == 1.0  # cosine: rotation, scale
    # by hand: nearest neighbours (cosine) in a: 0-1, 2-3; in b: 0-2, 1-3; in c: 0-1, 2-3 again
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    c = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.2, 0.0], [0.0, 0.0, 1.0], [0.0, 0.3, 1.0]])
    assert knn_agreement(a, b, k=1) == 0.0 and knn_agreement(a, c, k=1) == 1.0
    # k=2, rows 0..3: a {1,3} {0,3} {3,1} {2,1}; b {2,3} {3,2} {0,3} {1,2}: 1 + 1 + 1 + 2 shared of 8
    assert knn_agreement(a, b, k=2) == pytest.approx(5 / 8)
    unrelated = knn_agreement(x, torch.randn(40, 6, generator=g, dtype=torch.float64), k=5)
    assert unrelated < 0.4
    assert math.isnan(knn_agreement(torch.full((5, 2), float("nan")), x[:5], k=2))
    with pytest.raises(ValueError, match="1 <= k < N"):
        knn_agreement(x[:5], x[:5], k=5)
    with pytest.raises(ValueError, match="same N"):
        knn_agreement(x, x[:5])


def test_real_cross_task_transfer_sets():
    """digits-28: scikit-learn's digits at 28x28; mnist5k-8: MNIST-5k at 8x8; floats in [0, 1], labels kept."""
    tr, te = load_transfer("digits-28", None)
    d_tr, d_te = load_digits_split()
    assert tr.image_shape == (1, 28, 28) and len(tr) == len(d_tr) and torch.equal(tr.labels, d_tr.labels)
    assert float(tr.images.min()) >= 0 and float(tr.images.max()) <= 1 and len(te) == len(d_te)
    # area down-sampling averages pixels: an 8x8 mean equals the 28x28 mean up to the border weights
    tr8, te8 = load_transfer("mnist5k-8", None)
    assert tr8.image_shape == (1, 8, 8) and len(tr8) == 4000 and len(te8) == 1000
    assert abs(float(tr8.images.mean()) - float(load_mnist5k_split()[0].batch(torch.arange(4000)).mean())) < 0.01
