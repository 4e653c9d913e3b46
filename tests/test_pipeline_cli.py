"""The command line: --help of every subcommand, --config files, and a tiny end-to-end run."""
import json
import os
import subprocess
import sys

import pytest

from gacd_fast.cli import SUBCOMMANDS, build_parser, config_from_args, flag_of, main
from gacd_fast.distill.config import DemoConfig, DistillConfig, save_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_help_lists_every_option(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    import dataclasses

    for f in dataclasses.fields(SUBCOMMANDS[command][0]):
        assert flag_of(f) in out, f.name
    assert "--config" in out and "--out DIR" in out and "--out-dir" not in out  # the old name is a hidden alias
    assert "--resume" in out and "--no-progress" in out


@pytest.mark.slow
def test_python_dash_m_help():
    r = subprocess.run([sys.executable, "-m", "gacd_fast", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in SUBCOMMANDS)


def test_config_file_then_command_line(tmp_path):
    path = str(tmp_path / "d.yaml")
    save_config(DistillConfig(method="ard", lr=0.2, epochs=3), path)
    args = build_parser().parse_args(["distill", "--config", path, "--epochs", "5"])
    cfg = config_from_args(DistillConfig, args)
    assert (cfg.method, cfg.lr, cfg.epochs) == ("ard", 0.2, 5)


def test_out_and_hidden_alias():
    for flag in ("--out", "--out-dir"):
        args = build_parser().parse_args(["demo", flag, "somewhere", "--resume", "--no-progress"])
        cfg = config_from_args(DemoConfig, args)
        assert (cfg.out_dir, cfg.resume, cfg.progress) == ("somewhere", True, False)


def test_bad_inputs_give_clear_errors(tmp_path, capsys):
    out = str(tmp_path / "o")
    # missing data: exit 1, the message names what is missing
    assert main(["train-teacher", "--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", out]) == 1
    assert "cifar-10-batches-py" in capsys.readouterr().err
    assert main(["train-teacher", "--dataset", "stl10", "--out", out]) == 1
    assert "needs --data-dir" in capsys.readouterr().err
    assert main(["distill", "--method", "gacd", "--out", out]) == 1
    assert "--teacher" in capsys.readouterr().err
    assert main(["evaluate", "--teacher", str(tmp_path / "nope.pt"), "--out", out]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    assert main(["evaluate", "--out", out]) == 1
    assert "nothing to evaluate" in capsys.readouterr().err


@pytest.mark.parametrize("text,match", [
    ('{"bogus": 1}', "unknown EvaluateConfig option(s) ['bogus']"),
    ('{"pgd_steps": "many"}', "'pgd_steps' must be int"),
    ('{"dataset": "mnist"}', "'dataset': unknown value 'mnist'"),
    ('{"eps": -1}', "'eps' must be >= 0"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_files_exit_2(tmp_path, capsys, text, match):
    p = tmp_path / "c.json"
    p.write_text(text)
    assert main(["evaluate", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "bad configuration" in err and match in err


def test_bad_config_yaml_and_missing_file(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("methods: [natural, pgd_at]\n")
    assert main(["demo", "--config", str(p)]) == 2
    assert "'methods': unknown value 'pgd_at'" in capsys.readouterr().err
    assert main(["demo", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["demo", "--methods", "natural", "pgd_at"],  # old method name
    ["distill", "--method", "gacd_noreweight"],
    ["train-teacher", "--dataset", "mnist"],
    ["train-teacher", "--epochs", "ten"],
    ["demo", "--no-such-option", "1"],
])
def test_bad_command_lines_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and ("invalid" in err or "unrecognized arguments" in err)


def test_bad_option_value_from_command_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "o"), "--student-epochs", "0"]) == 2
    assert "'student_epochs' must be >= 1" in capsys.readouterr().err


@pytest.mark.slow
def test_subprocess_exit_codes(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("teacher_epochs: many\n")
    r = subprocess.run([sys.executable, "-m", "gacd_fast", "demo", "--config", str(p), "--out", str(tmp_path / "o")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'teacher_epochs' must be int" in r.stderr
    r = subprocess.run([sys.executable, "-m", "gacd_fast", "train-teacher", "--dataset", "cifar100", "--data-dir",
                        str(tmp_path), "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "cifar-100-python" in r.stderr


METHOD_KEYS = {"clean", "fgsm", "pgd20", "cw", "cka", "knn_agree", "seconds", "probe_clean", "probe_pgd20", "transfer_clean",
               "transfer_pgd20", "transfer_cka", "precision", "eval_precision"}


def check_results_schema(doc, methods):
    assert set(doc) == {"dataset", "eps", "device", "config", "versions", "inputs", "methods"}
    assert set(doc["inputs"]) == set(doc["methods"]) and all(len(h) == 64 for h in doc["inputs"].values())
    assert isinstance(doc["dataset"], str) and isinstance(doc["eps"], float) and isinstance(doc["device"], str)
    assert isinstance(doc["config"], dict)
    assert set(doc["versions"]) == {"torch", "triton", "gacd_fast", "python"}
    assert all(isinstance(v, str) for k, v in doc["versions"].items() if k != "triton")
    assert list(doc["methods"]) == list(methods)
    for name, m in doc["methods"].items():
        assert set(m) == METHOD_KEYS, name
        assert m["precision"] in ("fp32", "bf16", "fp16") and m["eval_precision"] in ("fp32", "bf16", "fp16")
        for k in METHOD_KEYS - {"cka", "transfer_cka", "seconds", "precision", "eval_precision"}:
            assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0, (name, k)
        for k in ("cka", "transfer_cka"):
            assert isinstance(m[k], float) and -1e-9 <= m[k] <= 1 + 1e-9, (name, k)
        assert isinstance(m["seconds"], float) and m["seconds"] > 0


@pytest.mark.slow
def test_tiny_demo_then_evaluate(tmp_path, capsys):
    out = str(tmp_path / "demo")
    tiny = ["--train-limit", "120", "--test-limit", "30", "--seed", "1"]
    assert main(["demo", "--out", out, "--teacher-epochs", "1", "--student-epochs", "2", "--attack-steps", "1",
                 "--probe-epochs", "2", "--eps-sweep", "3", *tiny]) == 0
    captured = capsys.readouterr()
    names = ("teacher", "natural", "at", "ard", "gacd", "gacd_noweight", "gacd_feature")
    for name in names:
        assert os.path.isfile(os.path.join(out, f"{name}.pt"))
        assert not os.path.exists(os.path.join(out, f"{name}.state.pt"))  # superseded by the final checkpoint
        assert f"\n{name} " in captured.out  # a row of the table
    assert "epoch" in captured.err and "evaluate" in captured.err  # tqdm bars on stderr
    for f in ("results.csv", "results.json", "results.png", "robust_vs_eps.png", "training_curves.png", "curves.json",
              "demo_config.yaml", "demo_config.json", "log.txt"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    log = open(os.path.join(out, "log.txt")).read()
    assert "[gacd] epoch   2/2 loss" in log and "[teacher] epoch   1/1 loss" in log
    assert "differences to gacd" in log and "pgd20" in log.split("differences to gacd")[1]  # the seed-noise statement
    doc = json.load(open(os.path.join(out, "results.json")))
    check_results_schema(doc, names)
    assert doc["dataset"] == "digits" and doc["eps"] == 0.2 and doc["device"] == "cpu"
    assert doc["config"]["student_epochs"] == 2 and doc["config"]["evaluation"]["pgd_steps"] == 20 and doc["methods"]["teacher"]["cka"] == pytest.approx(1.0)
    curves = json.load(open(os.path.join(out, "curves.json")))
    assert curves["eps_sweep"]["eps"] == pytest.approx([0.0, 0.15, 0.3]) and set(curves["eps_sweep"]["accuracy"]) == set(names)
    assert [r["epoch"] for r in curves["training"]["gacd"]] == [1, 2]
    assert doc["methods"]["gacd"]["seconds"] == pytest.approx(sum(r["time_s"] for r in curves["training"]["gacd"]))

    ev = str(tmp_path / "eval")  # checkpoints reload through `evaluate`
    assert main(["evaluate", "--out", ev, "--teacher", os.path.join(out, "teacher.pt"), "--checkpoints",
                 os.path.join(out, "gacd.pt"), "--transfer", "none", "--pgd-steps", "2", "--cw-steps", "2",
                 "--eps-sweep", "0", "--no-progress", *tiny]) == 0
    doc = json.load(open(os.path.join(ev, "results.json")))
    assert list(doc["methods"]) == ["teacher", "gacd"] and "pgd2" in doc["methods"]["gacd"]
    assert "transfer_clean" not in doc["methods"]["gacd"] and not os.path.exists(os.path.join(ev, "robust_vs_eps.png"))
    assert capsys.readouterr().err == ""  # --no-progress: no bars
