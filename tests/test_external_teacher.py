"""A teacher from any model: --teacher-factory module:function, --teacher-weights (a state dict, also
under "state_dict" and with "module." prefixes), --feature-layer and --teacher-normalization, for
distill, evaluate and study; each mistake is a one-line error that names the option."""
import json
import os

import pytest
import torch

from gacd_fast.cli import main
from gacd_fast.distill.config import DistillConfig, resolve
from gacd_fast.distill.data import load_digits_split
from gacd_fast.distill.external_teacher import build_external_teacher, parse_normalization

from robustbench_style import WideResNet

FACTORY = "robustbench_style:tiny_wrn"
DATA = ["--train-limit", "64", "--test-limit", "24", "--batch-size", "32", "--no-progress"]
TINY = [*DATA, "--epochs", "1", "--attack-steps", "1"]


@pytest.fixture(scope="module")
def saved_wrn(tmp_path_factory):
    """A WRN in RobustBench's naming, a few steps of CE on digits, saved as DataParallel would:
    {"state_dict": {"module.<name>": tensor}}; returns (path, model)."""
    torch.manual_seed(7)
    model = WideResNet()
    tr, _ = load_digits_split()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(0, 160, 32):
        loss = torch.nn.functional.cross_entropy(model(tr.batch(torch.arange(i, i + 32))), tr.labels[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = str(tmp_path_factory.mktemp("wrn") / "wrn.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    return path, model


def test_build_external_teacher(saved_wrn):
    path, model = saved_wrn
    x = load_digits_split()[1].batch(torch.arange(16))
    cfg = resolve(DistillConfig(teacher_factory=FACTORY, teacher_weights=path))
    rng = torch.get_rng_state()
    teacher = build_external_teacher(cfg, x, 10)
    assert torch.equal(torch.get_rng_state(), rng)  # the factory's initialisation leaves the run's RNG alone
    f, logits = teacher(x)
    assert teacher.feature_dim == 32 and f.shape == (16, 32) and not teacher.training
    assert torch.equal(logits, model(x))  # the saved weights, not the factory's fresh ones
    # a named layer, and a normalisation in front
    cfg = resolve(DistillConfig(teacher_factory=FACTORY, teacher_weights=path, feature_layer="block2",
                                teacher_normalization="0.5,0.25"))
    teacher = build_external_teacher(cfg, x, 10)
    f, logits = teacher(x)
    assert teacher.feature_dim == 16 * 4 * 4 and torch.allclose(logits, model((x - 0.5) / 0.25))
    assert parse_normalization("0.49,0.48,0.45, 0.25,0.24,0.26") == ([0.49, 0.48, 0.45], [0.25, 0.24, 0.26])


@pytest.mark.slow
def test_factory_teacher_distils_end_to_end(saved_wrn, tmp_path):
    """distill with a RobustBench-style factory and a saved state dict, then evaluate with it: the
    teacher row is the saved model's own accuracy."""
    path, model = saved_wrn
    out = str(tmp_path / "run")
    teacher = ["--teacher-factory", FACTORY, "--teacher-weights", path]
    assert main(["distill", "--method", "gacd", "--num-negatives", "16", *teacher, "--out", out, *TINY]) == 0
    assert main(["distill", "--method", "rslad", *teacher, "--out", out, *TINY]) == 0
    ckpt = torch.load(os.path.join(out, "gacd.pt"), weights_only=True)
    assert ckpt["config"]["teacher_factory"] == FACTORY and ckpt["config"]["teacher"] is None
    ev = str(tmp_path / "eval")
    assert main(["evaluate", *teacher, "--checkpoints", os.path.join(out, "gacd.pt"), os.path.join(out, "rslad.pt"),
                 "--pgd-steps", "2", "--cw-steps", "2", "--probe-epochs", "1", "--eps-sweep", "0",
                 "--transfer", "none", "--out", ev, *DATA]) == 0
    doc = json.load(open(os.path.join(ev, "results.json")))
    assert list(doc["methods"]) == ["teacher", "gacd", "rslad"] and doc["methods"]["teacher"]["cka"] == pytest.approx(1.0)
    test = load_digits_split()[1].subset(24, 0)
    with torch.no_grad():
        want = (model(test.batch(torch.arange(24))).argmax(1) == test.labels).float().mean().item()
    assert doc["methods"]["teacher"]["clean"] == pytest.approx(want)


@pytest.mark.slow
def test_study_with_a_factory_teacher(saved_wrn, tmp_path):
    path, _ = saved_wrn
    out = str(tmp_path / "study")
    assert main(["study", "--teacher-factory", FACTORY, "--teacher-weights", path, "--seeds", "0", "--methods", "ard",
                 "--student-epochs", "1", "--attack-steps", "1", "--train-limit", "64", "--test-limit", "24",
                 "--probe-epochs", "1", "--no-progress", "--out", out]) == 0
    assert not os.path.exists(os.path.join(out, "seed0", "teacher.pt"))  # nothing trained for the teacher
    assert set(json.load(open(os.path.join(out, "study.json")))["summary"]) == {"teacher", "ard"}


@pytest.mark.parametrize("args,code,message", [
    (["--teacher-weights", "w.pt"], 2, "--teacher-weights describe(s) a teacher built by --teacher-factory"),
    (["--feature-layer", "fc"], 2, "--feature-layer describe(s)"),
    (["--teacher-factory", FACTORY, "--teacher", "t.pt"], 2, "either --teacher"),
    (["--teacher-factory", FACTORY, "--teacher-normalization", "0.5"], 2, "'mean,std' per channel"),
    (["--teacher-factory", FACTORY, "--teacher-normalization", "0.5,0"], 2, "stds must be > 0"),
    (["--teacher-factory", "robustbench_style.tiny_wrn"], 1, "must be 'module:function'"),
    (["--teacher-factory", "no_such_module_here:f"], 1, "cannot import 'no_such_module_here'"),
    (["--teacher-factory", "robustbench_style:nope"], 1, "robustbench_style has no 'nope'"),
    (["--teacher-factory", "robustbench_style:not_a_model"], 1, "returned str, not a torch.nn.Module"),
    (["--teacher-factory", FACTORY, "--feature-layer", "block9"], 1, "--feature-layer: FeatureTap: WideResNet has no submodule named 'block9'"),
    (["--teacher-factory", FACTORY, "--teacher-weights", "missing.pt"], 1, "--teacher-weights: file not found"),
])
def test_errors_name_the_option(tmp_path, capsys, args, code, message):
    assert main(["distill", "--method", "ard", "--out", str(tmp_path / "x"), *args, *TINY]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_weights_that_do_not_fit(tmp_path, capsys):
    bad = str(tmp_path / "bad.pt")
    torch.save({"conv1.weight": torch.zeros(8, 1, 3, 3), "other.weight": torch.zeros(2)}, bad)
    assert main(["distill", "--method", "ard", "--teacher-factory", FACTORY, "--teacher-weights", bad,
                 "--out", str(tmp_path / "x"), *TINY]) == 1
    err = capsys.readouterr().err
    assert "does not fit the --teacher-factory model: missing [" in err and "unexpected ['other.weight']" in err
    pickle = str(tmp_path / "pickle.pt")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "opt": object()}, pickle)  # not weights_only-loadable
    assert main(["distill", "--method", "ard", "--teacher-factory", FACTORY, "--teacher-weights", pickle,
                 "--out", str(tmp_path / "y"), *TINY]) == 1
    assert "weights_only=True" in capsys.readouterr().err
