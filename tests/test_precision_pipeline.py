"""The pipeline's speed options: --precision (training under autocast, fp16 with a gradient scaler
that resumes exactly), --eval-precision, --channels-last, --compile, --bank-dtype, and that every
config and results file records the precision."""
import csv
import json
import os
import warnings

import pytest
import torch

from gacd_fast import _precision
from gacd_fast.cli import main
from gacd_fast.distill import config, pipeline
from gacd_fast.distill.data import load_digits_split
from gacd_fast.distill.methods import Method, StepOutput
from gacd_fast.distill.models import build_model
from gacd_fast.distill.train import Speed, fit
from gacd_fast.loss import BANK_DTYPES

TINY = ["--train-limit", "48", "--test-limit", "16", "--attack-steps", "1", "--no-progress"]


@pytest.fixture(autouse=True)
def _no_emulation_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*runs emulated on this CPU", category=RuntimeWarning)
        yield


def test_option_choices_match_the_library():
    assert config.PRECISION_CHOICES == _precision.PRECISIONS
    assert config.BANK_DTYPE_CHOICES == tuple(BANK_DTYPES)
    for cls in (config.TeacherConfig, config.DistillConfig, config.DemoConfig, config.StudyConfig):
        cfg = cls()
        assert (cfg.precision, cfg.eval_precision, cfg.channels_last, cfg.compile) == ("fp32", "fp32", False, False)
    assert config.EvaluateConfig().eval_precision == "fp32"


class Recorder(Method):
    """Records what a training step sees: the autocast region, the batch's memory format, the model."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def step(self, model, x, y, index):
        self.seen.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"), model))
        _, logits = model(x)
        return StepOutput(torch.nn.functional.cross_entropy(logits.float(), y), logits, {})


@pytest.mark.parametrize("speed,dtype", [(Speed(), False), (Speed(precision="bf16", channels_last=True), torch.bfloat16),
                                         (Speed(precision="fp16"), torch.float16)])
def test_fit_runs_the_step_under_the_precision(speed, dtype):
    train, test = load_digits_split()
    model, method = build_model("small_cnn_student", 10, 1), Recorder()
    fit(model, method, train.subset(16), epochs=1, batch_size=8, lr=0.05, device=torch.device("cpu"),
        test=test.subset(8), log=lambda s: None, speed=speed)
    assert [d for d, _ in method.seen] == [dtype] * 2
    assert all(m is model for _, m in method.seen)
    conv = model.body[1][0].weight
    assert conv.dtype == torch.float32 and conv.is_contiguous(memory_format=torch.channels_last) == speed.channels_last
    x = torch.rand(2, 3, 4, 5)
    assert speed.images(x).is_contiguous(memory_format=torch.channels_last) == speed.channels_last
    assert speed.images(x).is_contiguous() != speed.channels_last


def test_compile_steps_through_the_compiled_module_and_saves_the_model(monkeypatch, tmp_path):
    compiled = []

    def fake_compile(model):
        wrapper = torch.nn.Module()
        wrapper.inner = model
        wrapper.forward = model.forward
        compiled.append(wrapper)
        return wrapper

    monkeypatch.setattr(torch, "compile", fake_compile)
    train, _ = load_digits_split()
    model, method = build_model("small_cnn_student", 10, 1), Recorder()
    state = str(tmp_path / "s.state.pt")
    fit(model, method, train.subset(8), epochs=1, batch_size=8, lr=0.05, device=torch.device("cpu"),
        log=lambda s: None, speed=Speed(compile=True), state_path=state)
    assert len(compiled) == 1 and method.seen[0][1] is compiled[0]
    saved = torch.load(state, weights_only=True)["model"]
    assert saved.keys() == model.state_dict().keys()


def test_a_precision_the_device_cannot_run_names_the_option(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(_precision._verdicts, ("fp16", "cpu"), "no fp16 here (injected)")
    out = str(tmp_path / "t")
    assert main(["train-teacher", "--out", out, "--epochs", "1", *TINY, "--precision", "fp16"]) == 1
    err = capsys.readouterr().err
    assert "--precision: precision='fp16' cannot run on cpu: no fp16 here (injected)" in err
    assert main(["evaluate", "--teacher", str(tmp_path / "x.pt"), "--out", out, "--eval-precision", "fp16"]) == 1


def test_bad_precision_options_exit_2(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text('{"precision": "fp64"}')
    assert main(["distill", "--config", str(p)]) == 2
    assert "'precision': unknown value 'fp64'" in capsys.readouterr().err
    p.write_text('{"bank_dtype": "fp16"}')
    assert main(["distill", "--config", str(p)]) == 2
    with pytest.raises(SystemExit) as e:
        main(["demo", "--eval-precision", "half"])
    assert e.value.code == 2


@pytest.mark.slow
def test_bf16_runs_record_the_precision_everywhere(tmp_path):
    out = str(tmp_path / "run")
    speed = ["--precision", "bf16", "--channels-last"]
    assert main(["train-teacher", "--out", out, "--epochs", "1", *TINY, *speed]) == 0
    teacher = os.path.join(out, "teacher.pt")
    assert main(["distill", "--out", out, "--teacher", teacher, "--method", "gacd", "--epochs", "1", *TINY, *speed,
                 "--bank-dtype", "bf16", "--num-negatives", "16"]) == 0
    for name in ("teacher_config", "gacd_config"):
        cfg = json.load(open(os.path.join(out, f"{name}.json")))
        assert (cfg["precision"], cfg["eval_precision"], cfg["channels_last"]) == ("bf16", "fp32", True), name
    assert json.load(open(os.path.join(out, "gacd_config.json")))["bank_dtype"] == "bf16"
    assert torch.load(os.path.join(out, "gacd.pt"), weights_only=True)["config"]["precision"] == "bf16"
    assert main(["evaluate", "--out", out, "--teacher", teacher, "--checkpoints", os.path.join(out, "gacd.pt"),
                 "--test-limit", "16", "--pgd-steps", "2", "--cw-steps", "2", "--eps-sweep", "0", "--transfer", "none",
                 "--no-feature-probe", "--no-progress"]) == 0
    doc = json.load(open(os.path.join(out, "results.json")))
    assert doc["config"]["eval_precision"] == "fp32"
    for name in ("teacher", "gacd"):
        assert (doc["methods"][name]["precision"], doc["methods"][name]["eval_precision"]) == ("bf16", "fp32")
    rows = list(csv.DictReader(open(os.path.join(out, "results.csv"))))
    assert {(r["precision"], r["eval_precision"]) for r in rows} == {("bf16", "fp32")}


@pytest.mark.slow
def test_fp16_training_keeps_its_gradient_scaler_across_a_resume(tmp_path):
    args = ["--epochs", "2", *TINY, "--precision", "fp16"]
    ref, res = str(tmp_path / "ref"), str(tmp_path / "res")
    assert main(["train-teacher", "--out", ref, *args]) == 0

    class Interrupt(Exception):
        pass

    def stop(tag, epoch):
        raise Interrupt

    with pytest.raises(Interrupt):
        main(["train-teacher", "--out", res, *args], callbacks=[stop])
    state = torch.load(os.path.join(res, "teacher.state.pt"), weights_only=True)
    assert state["grad_scaler"]["scale"] > 0
    assert main(["train-teacher", "--out", res, *args, "--resume"]) == 0
    a = torch.load(os.path.join(ref, "teacher.pt"), weights_only=True)["state_dict"]
    b = torch.load(os.path.join(res, "teacher.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_precision_is_the_evaluation_region(monkeypatch, tmp_path):
    seen = []

    def fake_eval(models, test, **kw):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
        return [{"model": name, "clean": 1.0} for name in models]

    monkeypatch.setattr(pipeline, "evaluate_models", fake_eval)
    teacher = str(tmp_path / "t")
    assert main(["train-teacher", "--out", teacher, "--epochs", "1", *TINY]) == 0
    path = os.path.join(teacher, "teacher.pt")
    for precision, want in (("fp32", False), ("bf16", torch.bfloat16)):
        assert main(["evaluate", "--teacher", path, "--out", str(tmp_path / precision), "--eval-precision", precision,
                     "--eps-sweep", "0", "--no-progress", "--test-limit", "8"]) == 0
        assert seen[-1] == want
        doc = json.load(open(os.path.join(tmp_path, precision, "results.json")))
        assert doc["methods"]["teacher"]["eval_precision"] == precision
        assert doc["methods"]["teacher"]["precision"] == "fp32"
