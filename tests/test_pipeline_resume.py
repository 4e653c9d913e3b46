"""--resume: a demo interrupted after some epoch of some model continues from its last per-epoch
checkpoint, does not retrain finished models, and ends with exactly the numbers and weights of an
uninterrupted run. Checkpoints are written atomically."""
import json
import os

import pytest
import torch

from gacd_fast.cli import main
from gacd_fast.distill.atomic import atomic_torch_save
from gacd_fast.distill.methods import Natural
from gacd_fast.distill.train import fit

TINY = ["--train-limit", "96", "--test-limit", "24", "--teacher-epochs", "2", "--student-epochs", "3",
        "--attack-steps", "1", "--probe-epochs", "2", "--eps-sweep", "3", "--methods", "at", "gacd", "--no-progress"]
MODELS = ("teacher", "at", "gacd")


class Interrupt(Exception):
    pass


def run(out, callbacks, *extra):
    return main(["demo", "--out", out, *TINY, *extra], callbacks=callbacks)


def numbers(out):
    doc = json.load(open(os.path.join(out, "results.json")))
    methods = {k: {m: v for m, v in d.items() if m != "seconds"} for k, d in doc["methods"].items()}
    curves = json.load(open(os.path.join(out, "curves.json")))
    hist = {k: [{m: v for m, v in r.items() if m != "time_s"} for r in h] for k, h in curves["training"].items()}
    return methods, curves["eps_sweep"], hist


def weights(out, name):
    return torch.load(os.path.join(out, f"{name}.pt"), weights_only=True)["state_dict"]


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path):
    ref, res = str(tmp_path / "ref"), str(tmp_path / "res")
    seen = []
    assert run(ref, [lambda tag, ep: seen.append((tag, ep))]) == 0
    assert seen == [("teacher", 1), ("teacher", 2), ("at", 1), ("at", 2), ("at", 3), ("gacd", 1), ("gacd", 2), ("gacd", 3)]

    def stop(tag, ep):
        if (tag, ep) == ("gacd", 1):
            raise Interrupt  # as if killed right after gacd's first epoch
    with pytest.raises(Interrupt):
        run(res, [stop])
    assert os.path.isfile(os.path.join(res, "gacd.state.pt")) and not os.path.exists(os.path.join(res, "gacd.pt"))
    state = torch.load(os.path.join(res, "gacd.state.pt"), weights_only=True)
    assert state["epoch"] == 1 and "criterion.bank_t.rows" in state["method"]
    assert {"optimizer", "scheduler", "loader_generator", "rng", "history"} <= set(state)

    seen = []
    assert run(res, [lambda tag, ep: seen.append((tag, ep))], "--resume") == 0
    assert seen == [("gacd", 2), ("gacd", 3)]  # teacher and at are finished: not retrained
    assert numbers(res) == numbers(ref)
    for name in MODELS:
        a, b = weights(ref, name), weights(res, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log = open(os.path.join(res, "log.txt")).read()
    assert "[gacd] resuming after epoch 1/3" in log and "[teacher] --resume:" in log
    doc = json.load(open(os.path.join(res, "results.json")))
    assert doc["methods"]["gacd"]["seconds"] > 0

    # a finished run resumes to the same numbers without training anything
    seen = []
    assert run(res, [lambda tag, ep: seen.append((tag, ep))], "--resume") == 0
    assert seen == [] and numbers(res) == numbers(ref)


def test_resume_rejects_other_config(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["train-teacher", "--out", out, "--epochs", "1", "--train-limit", "32", "--test-limit", "8",
                 "--attack-steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train-teacher", "--out", out, "--epochs", "2", "--train-limit", "32", "--test-limit", "8",
                 "--attack-steps", "1", "--no-progress", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "different configuration" in err and "epochs: 1 there, 2 now" in err


def test_keyboard_interrupt_exit_code(tmp_path, capsys):
    def stop(tag, ep):
        raise KeyboardInterrupt
    assert main(["train-teacher", "--out", str(tmp_path), "--epochs", "2", "--train-limit", "32",
                 "--test-limit", "8", "--attack-steps", "1", "--no-progress"], callbacks=[stop]) == 130
    assert "--resume" in capsys.readouterr().err
    assert os.path.isfile(tmp_path / "teacher.state.pt")


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "x.pt")
    atomic_torch_save({"a": torch.ones(2)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        atomic_torch_save({"a": Boom()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["x.pt"]  # no temporary left behind


def test_callbacks_must_be_callable():
    with pytest.raises(TypeError, match=r"callbacks\[1\] must be callable as callback\(tag, epoch\), got str"):
        fit(torch.nn.Linear(1, 1), Natural(), None, epochs=1, batch_size=1, lr=0.1, device=torch.device("cpu"),
            callbacks=[print, "stop"])


@pytest.mark.slow
def test_resume_the_newer_baselines(tmp_path):
    """distill --resume of RSLAD, IAD (its step count crosses the interruption: the introspection
    starts in epoch 2) and AdaAD ends with the weights and history of an uninterrupted run."""
    teacher = str(tmp_path / "t")
    data = ["--train-limit", "96", "--test-limit", "24", "--attack-steps", "1", "--no-progress"]
    assert main(["train-teacher", "--out", teacher, "--epochs", "1", *data]) == 0
    common = ["--teacher", os.path.join(teacher, "teacher.pt"), "--epochs", "3", "--iad-begin", "0.34", *data]

    def stop(tag, ep):
        if ep == 1:
            raise Interrupt
    for method in ("rslad", "iad", "adaad"):
        ref, res = str(tmp_path / f"{method}_ref"), str(tmp_path / f"{method}_res")
        assert main(["distill", "--method", method, "--out", ref, *common]) == 0
        with pytest.raises(Interrupt):
            main(["distill", "--method", method, "--out", res, *common], callbacks=[stop])
        assert main(["distill", "--method", method, "--out", res, "--resume", *common]) == 0
        a, b = (torch.load(os.path.join(d, f"{method}.pt"), weights_only=True) for d in (ref, res))
        assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"]), method
        strip = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
        assert strip(a["history"]) == strip(b["history"]), method
        if method == "iad":
            assert "introspection_loss" not in a["history"][0] and "introspection_loss" in a["history"][1]


def test_config_mismatch_reads_runs_of_older_versions():
    """A run saved before an option existed resumes when the option is at its declared default (the
    behaviour from before it), not when it is set otherwise; None defaults come from the dataset."""
    from gacd_fast.distill.train import config_mismatch

    now = {"dataset": "mnist5k", "epochs": 8, "precision": "fp32", "bank_dtype": "fp32", "compile": False,
           "kd_kl_reduction": "batchmean"}
    old = {"dataset": "mnist5k", "epochs": 8}
    assert config_mismatch(old, now) == []
    assert config_mismatch(old, {**now, "precision": "bf16"}) == ["precision"]
    assert config_mismatch(old, {**now, "unknown_new_key": 1}) == ["unknown_new_key"]
    assert config_mismatch({**old, "epochs": 4}, now) == ["epochs"]


def test_resume_a_checkpoint_of_an_older_version(tmp_path, capsys):
    """A finished teacher whose saved config lacks the options added since (precision, ...) is
    reused by --resume instead of refused."""
    out = str(tmp_path / "t")
    args = ["train-teacher", "--out", out, "--epochs", "1", "--train-limit", "32", "--test-limit", "8",
            "--attack-steps", "1", "--no-progress"]
    assert main(args) == 0
    path = os.path.join(out, "teacher.pt")
    meta = torch.load(path, weights_only=True)
    for key in ("precision", "eval_precision", "channels_last", "compile"):
        del meta["config"][key]
    atomic_torch_save(meta, path)
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert "is finished, not retrained" in capsys.readouterr().out


def test_evaluate_resume_reuses_a_finished_evaluation(tmp_path, capsys):
    """evaluate --resume does not run the attacks again on the same files with the same options; a
    changed option or a changed checkpoint is evaluated again."""
    t = str(tmp_path / "t")
    assert main(["train-teacher", "--out", t, "--epochs", "1", "--train-limit", "32", "--test-limit", "8",
                 "--attack-steps", "1", "--no-progress"]) == 0
    teacher = os.path.join(t, "teacher.pt")
    out = str(tmp_path / "e")
    ev = ["evaluate", "--teacher", teacher, "--out", out, "--test-limit", "8", "--train-limit", "32",
          "--probe-epochs", "1", "--eps-sweep", "0", "--transfer", "none", "--no-progress", "--pgd-steps", "2"]
    assert main(ev) == 0
    results = os.path.join(out, "results.json")
    doc = json.load(open(results))
    assert set(doc["inputs"]) == {"teacher"}
    capsys.readouterr()
    assert main([*ev, "--resume"]) == 0
    assert "not evaluated again" in capsys.readouterr().out
    assert json.load(open(results)) == doc  # untouched
    assert main([*ev, "--resume", "--cw-steps", "2"]) == 0
    assert "not evaluated again" not in capsys.readouterr().out
    meta = torch.load(teacher, weights_only=True)
    meta["seconds"] = 1.0  # another file, the same options
    atomic_torch_save(meta, teacher)
    assert main([*ev, "--resume", "--cw-steps", "2"]) == 0
    assert "not evaluated again" not in capsys.readouterr().out
