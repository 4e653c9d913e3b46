"""Runs, resumes and output folders (issue 18, sections 2-5): every case runs through
``gacd_fast.cli.main`` in a temporary folder and ends in a finished run or in one line on stderr that
names the file or option and says what to do (exit 1: the run; exit 2: the configuration)."""
import errno
import json
import os
import pickle
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from gacd_fast.cli import main
from gacd_fast.distill.atomic import atomic_torch_save, atomic_write_text
from gacd_fast.distill.cka import linear_cka
from gacd_fast.distill.config import StudyConfig, validate
from gacd_fast.distill.data import DatasetFileError, ImageDataset, iterate, load_cifar
from gacd_fast.distill.methods import Natural
from gacd_fast.distill.models import build_model
from gacd_fast.distill.train import fit, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--train-limit", "32", "--test-limit", "8", "--attack-steps", "1", "--no-progress"]
STUDENT = ["--method", "gacd", "--num-negatives", "8", "--train-limit", "48", "--test-limit", "8",
           "--attack-steps", "1", "--no-progress"]


class Stop(Exception):
    pass


def err_line(capsys):
    """stderr of the last call: one line (tqdm's bars are off), returned without its newline."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny digits teachers of different seeds (different weights)."""
    paths = []
    for seed in (0, 1):
        out = str(tmp_path_factory.mktemp(f"teacher{seed}"))
        assert main(["train-teacher", "--out", out, "--epochs", "1", "--seed", str(seed), *QUICK]) == 0
        paths.append(os.path.join(out, "teacher.pt"))
    return paths


# -- section 2, row 1: a one-sample last batch --------------------------------------------------

def test_a_one_sample_last_batch_joins_the_batch_before_it():
    from gacd_fast.distill.train import num_batches

    ds = ImageDataset(torch.zeros(65, 1, 2, 2), torch.zeros(65, dtype=torch.long), 2, "toy")
    sizes = [len(i) for _, _, i in iterate(ds, 64, merge_tail=True)]
    assert sizes == [65] and num_batches(65, 64) == 1
    assert [len(i) for _, _, i in iterate(ds, 32, merge_tail=True)] == [32, 33] and num_batches(65, 32) == 2
    assert [len(i) for _, _, i in iterate(ds, 64)] == [64, 1]  # evaluation keeps every batch as it is
    assert [len(i) for _, _, i in iterate(ds, 65, merge_tail=True)] == [65] and num_batches(66, 64) == 2
    # under torch.distributed the merge is of the global batch, before it is split over the ranks
    parts = [[len(i) for _, _, i in iterate(ds, 64, merge_tail=True, rank=r, world_size=2)] for r in (0, 1)]
    assert parts == [[33], [32]]


@pytest.mark.slow
def test_batch_bank_survives_an_epoch_ending_in_one_sample(tmp_path, teachers):
    out = str(tmp_path)
    args = ["distill", "--out", out, "--teacher", teachers[0], "--bank", "batch", "--batch-size", "16",
            "--epochs", "2", *STUDENT[:4], "--train-limit", "33", *STUDENT[6:]]

    def stop(tag, epoch):
        raise KeyboardInterrupt
    assert main(args, callbacks=[stop]) == 130  # epoch 1 ends in a merged 17-sample batch
    assert main([*args, "--resume"]) == 0
    assert os.path.isfile(os.path.join(out, "gacd.pt"))


# -- section 3, rows 5-9 ---------------------------------------------------------------------

@pytest.mark.slow
def test_resume_refuses_another_teacher(tmp_path, teachers, capsys):
    a, b = teachers
    out = str(tmp_path / "s")
    args = ["distill", "--out", out, "--epochs", "2", *STUDENT]

    def stop(tag, epoch):
        raise KeyboardInterrupt
    assert main([*args, "--teacher", a], callbacks=[stop]) == 130
    capsys.readouterr()
    assert main([*args, "--teacher", b, "--resume"]) == 1  # the state file was trained with a
    err = err_line(capsys)
    assert "gacd.state.pt was trained with another teacher" in err and b in err
    moved = str(tmp_path / "same_teacher_elsewhere.pt")
    with open(a, "rb") as src, open(moved, "wb") as dst:
        dst.write(src.read())
    assert main([*args, "--teacher", moved, "--resume"]) == 0  # the same content under another path
    saved = torch.load(os.path.join(out, "gacd.pt"), weights_only=True)["config"]
    import hashlib

    assert saved["teacher_sha256"] == hashlib.sha256(open(a, "rb").read()).hexdigest()
    capsys.readouterr()
    assert main([*args, "--teacher", b, "--resume"]) == 1  # the finished student too
    assert "gacd.pt was trained with another teacher" in err_line(capsys)


@pytest.mark.slow
def test_refused_resume_rewrites_no_config(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["train-teacher", "--out", out, "--epochs", "1", *QUICK]) == 0
    before = open(os.path.join(out, "teacher_config.json")).read()
    assert json.loads(before)["epochs"] == 1
    capsys.readouterr()
    assert main(["train-teacher", "--out", out, "--epochs", "2", "--resume", *QUICK]) == 1
    assert "different configuration" in err_line(capsys)
    assert open(os.path.join(out, "teacher_config.json")).read() == before
    assert "epochs: 1" in open(os.path.join(out, "teacher_config.yaml")).read()


def _hold_lock_in_another_process(out):
    code = ("import sys\nfrom gacd_fast.distill import runs\n"
            "with runs.locked(sys.argv[1], 'the holder'):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen([sys.executable, "-c", code, out], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.slow
def test_two_runs_in_one_folder(tmp_path, capsys):
    out = str(tmp_path)
    holder = _hold_lock_in_another_process(out)
    try:
        assert main(["train-teacher", "--out", out, "--epochs", "1", *QUICK]) == 1
        err = err_line(capsys)
        assert f"--out {out} is in use by another gacd-fast run" in err and "the holder" in err
        assert not os.path.exists(os.path.join(out, "teacher_config.json"))
    finally:
        holder.communicate("", timeout=60)
    assert main(["train-teacher", "--out", out, "--epochs", "1", *QUICK]) == 0  # free again


def test_two_threads_in_one_folder(tmp_path, capsys):
    """In one process the lock is re-entrant for the thread holding it (the demo's teacher and students
    share its folder), not for another thread."""
    out = str(tmp_path)
    inside, release, codes = threading.Event(), threading.Event(), []

    def wait(tag, epoch):
        inside.set()
        release.wait(60)
    t = threading.Thread(target=lambda: codes.append(main(["train-teacher", "--out", out, "--epochs", "1", *QUICK],
                                                          callbacks=[wait])))
    t.start()
    try:
        assert inside.wait(120)
        assert main(["train-teacher", "--out", out, "--epochs", "1", "--seed", "1", *QUICK]) == 1
        assert "is in use by another gacd-fast run" in capsys.readouterr().err
    finally:
        release.set()
        t.join(120)
    assert codes == [0]


@pytest.mark.slow
def test_stale_temporaries_are_removed(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    stale = [out / ".teacher.state.pt.k2j_x9a1.tmp", out / ".results.json.abcdefgh.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    keep = [out / ".hidden", out / "notes.tmp", out / ".x.tmp"]
    for p in keep:
        p.write_text("mine")
    assert main(["train-teacher", "--out", str(out), "--epochs", "1", *QUICK]) == 0
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    # fit() alone (no run folder lock) removes its own state file's leftovers
    own, other = tmp_path / ".s.state.pt.a1b2c3d4.tmp", tmp_path / ".other.pt.a1b2c3d4.tmp"
    own.write_bytes(b"x")
    other.write_bytes(b"x")
    data = ImageDataset(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 0, 1]), 10, "toy")
    fit(build_model("small_cnn_student", 10, 1), Natural(), data, epochs=1, batch_size=4, lr=0.1,
        device=torch.device("cpu"), state_path=str(tmp_path / "s.state.pt"))
    assert not own.exists() and other.exists()


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        path = str(tmp_path / "r.json")
        atomic_write_text(path, "{}")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
        atomic_write_text(path, "{}\n")  # replacing keeps them
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask
        atomic_torch_save({"a": 1}, str(tmp_path / "c.pt"))
        assert stat.S_IMODE(os.stat(tmp_path / "c.pt").st_mode) == 0o666 & ~mask
    finally:
        os.umask(old)


@pytest.mark.slow
def test_run_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["train-teacher", "--out", str(tmp_path), "--epochs", "1", *QUICK]) == 0
    finally:
        os.umask(old)
    for name in ("teacher.pt", "teacher_config.json", "teacher_config.yaml"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# -- section 4 -------------------------------------------------------------------------------

def _foreign_teacher(path, classes, channels, dataset):
    model = build_model("small_cnn_teacher", classes, channels)
    save_checkpoint(path, model, arch="small_cnn_teacher", num_classes=classes, in_channels=channels, role="teacher",
                    method="at", config={"dataset": dataset, "seed": 0, "split_seed": None})
    return path


@pytest.mark.parametrize("classes,channels,dataset", [(5, 3, "cifar10"), (10, 3, "cifar10"), (5, 1, "digits"),
                                                      (10, 1, "mnist5k")])
def test_teacher_of_another_task_is_refused(tmp_path, capsys, classes, channels, dataset):
    teacher = _foreign_teacher(str(tmp_path / "t.pt"), classes, channels, dataset)
    assert main(["distill", "--out", str(tmp_path / "s"), "--teacher", teacher, "--epochs", "1", *STUDENT]) == 1
    err = err_line(capsys)
    assert (f"--teacher {teacher} was trained on {dataset} ({classes} classes, {channels} channels); this run is "
            "digits (10 classes, 1 channels)") in err
    if dataset != "mnist5k":  # evaluation scores models of the same shape on another dataset
        assert main(["evaluate", "--out", str(tmp_path / "e"), "--teacher", teacher, "--test-limit", "8",
                     "--no-progress"]) == 1
        assert "was trained on" in err_line(capsys)


@pytest.mark.slow
def test_demo_with_a_foreign_teacher_or_not_a_checkpoint(tmp_path, capsys):
    teacher = _foreign_teacher(str(tmp_path / "t.pt"), 5, 3, "cifar10")
    tiny = ["--methods", "natural", "gacd", "--student-epochs", "1", *QUICK]
    assert main(["demo", "--out", str(tmp_path / "d"), "--teacher", teacher, *tiny]) == 1
    assert "was trained on cifar10 (5 classes, 3 channels)" in err_line(capsys)
    junk = tmp_path / "not_a_checkpoint.pt"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["demo", "--out", str(tmp_path / "d2"), "--teacher", str(junk), *tiny]) == 1
    err = err_line(capsys)
    assert f"{junk} is not a readable gacd-fast model checkpoint" in err and "weights_only" not in err


@pytest.mark.slow
def test_non_finite_loss_stops_the_run(tmp_path, capsys):
    out = str(tmp_path)
    assert main(["train-teacher", "--out", out, "--lr", "1e6", "--epochs", "3", "--batch-size", "16", *QUICK]) == 1
    err = err_line(capsys)
    assert "the training loss is" in err and "training stopped" in err and "--lr" in err
    assert not os.path.exists(os.path.join(out, "teacher.pt"))


def test_cka_of_non_finite_features_is_nan():
    x = torch.randn(20, 5)
    y = x.clone()
    y[3, 1] = float("nan")
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert np.isnan(linear_cka(x, y)) and np.isnan(linear_cka(y, x))
    y[3, 1] = float("inf")
    assert np.isnan(linear_cka(x, y))
    assert linear_cka(x, torch.ones(20, 3)) == 0.0  # a constant representation is still 0


def test_a_diverged_checkpoint_is_refused(tmp_path, capsys):
    model = build_model("small_cnn_student", 10, 1)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    path = str(tmp_path / "nan.pt")
    save_checkpoint(path, model, arch="small_cnn_student", num_classes=10, in_channels=1, role="student",
                    method="natural", config={"dataset": "digits"})
    assert main(["evaluate", "--out", str(tmp_path / "e"), "--checkpoints", path, "--test-limit", "8",
                 "--no-progress"]) == 1
    assert "holds NaN/inf weights" in err_line(capsys)


def _write_cifar(root, train, test, data_dtype=np.uint8, label_fn=lambda n: list(range(n))):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = test if name == "test_batch" else train
        data = (np.arange(n * 3072).reshape(n, 3072) % 256).astype(data_dtype)
        with open(os.path.join(d, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": label_fn(n)}, f)
    return d


@pytest.mark.parametrize("case", ["float pixels in [0, 1]", "int64 300", "int64 -1", "float labels"])
def test_malformed_cifar_values_are_refused(tmp_path, case):
    d = _write_cifar(str(tmp_path), 2, 2)
    path = os.path.join(d, "data_batch_2")
    data = np.zeros((2, 3072), np.uint8)
    labels = [0, 1]
    if case == "float pixels in [0, 1]":
        data = np.full((2, 3072), 0.5)
    elif case == "int64 300":
        data = np.full((2, 3072), 300, np.int64)
    elif case == "int64 -1":
        data = np.full((2, 3072), -1, np.int64)
    else:
        labels = [1.7, 0.0]
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f)
    with pytest.raises(DatasetFileError, match="malformed file .*data_batch_2"):
        load_cifar(str(tmp_path), "cifar10")
    with open(path, "wb") as f:  # integer pixels within 0..255 in a wider dtype are fine
        pickle.dump({b"data": np.full((2, 3072), 255, np.int64), b"labels": np.array([3, 4])}, f)
    tr, _ = load_cifar(str(tmp_path), "cifar10")
    assert tr.images.dtype == torch.uint8 and int(tr.images.max()) == 255


def test_duplicate_or_bad_seeds_are_refused_before_anything_runs(tmp_path, capsys):
    from gacd_fast.distill.config import ConfigError

    with pytest.raises(ConfigError, match=r"repeats \[0\]"):
        validate(StudyConfig(seeds=[0, 1, 0]))
    out = str(tmp_path / "st")
    tiny = ["--methods", "natural", "--teacher-epochs", "1", "--student-epochs", "1", "--probe-epochs", "1", *QUICK]
    assert main(["study", "--out", out, "--seeds", "0", "0", *tiny]) == 2
    assert "repeats [0]" in capsys.readouterr().err
    assert main(["study", "--out", out, "--seeds", "0", "-1", *tiny]) == 2
    assert "seed -1 is outside" in capsys.readouterr().err
    assert not os.path.exists(out)  # seed 0 did not run first
    assert main(["train-teacher", "--out", out, "--seed", str(2**70), *QUICK]) == 2
    assert "is outside 0..4294967295" in capsys.readouterr().err


def test_empty_splits_are_refused(tmp_path, capsys):
    _write_cifar(str(tmp_path / "data"), 0, 3)
    common = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--no-progress"]
    assert main(["train-teacher", "--out", str(tmp_path / "t"), "--model", "small_cnn_teacher", "--epochs", "1",
                 "--attack-steps", "1", *common]) == 1
    assert "cifar10: the training split holds no images" in err_line(capsys)
    _write_cifar(str(tmp_path / "data2"), 2, 0)
    student = str(tmp_path / "s.pt")
    save_checkpoint(student, build_model("small_cnn_student", 10, 3), arch="small_cnn_student", num_classes=10,
                    in_channels=3, role="student", method="natural", config={"dataset": "cifar10"})
    assert main(["evaluate", "--out", str(tmp_path / "e"), "--checkpoints", student, "--dataset", "cifar10",
                 "--data-dir", str(tmp_path / "data2"), "--no-progress"]) == 1
    assert "cifar10: the test split holds no images" in err_line(capsys)


@pytest.mark.parametrize("name", ["/abs/x", "../x", "a/b", "..", ""])
def test_name_must_be_a_plain_file_name(tmp_path, capsys, name):
    out = tmp_path / "o"
    assert main(["distill", "--out", str(out), "--method", "natural", "--name", name, "--epochs", "1", *QUICK]) == 2
    assert "must be a plain file name" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.pt").exists()


# -- section 5: unclear errors become one line -----------------------------------------------

def _state_file(tmp_path):
    """A real teacher state file (an interrupted run's)."""
    out = str(tmp_path / "src")

    def stop(tag, epoch):
        raise KeyboardInterrupt
    assert main(["train-teacher", "--out", out, "--epochs", "2", *QUICK], callbacks=[stop]) == 130
    return open(os.path.join(out, "teacher.state.pt"), "rb").read()


@pytest.mark.parametrize("kind", ["empty", "garbage", pytest.param("truncated", marks=pytest.mark.slow), "a list",
                                  "a dict of other things", "pickle"])
def test_unreadable_state_file_on_resume(tmp_path, capsys, kind):
    out = tmp_path / "o"
    out.mkdir()
    path = out / "teacher.state.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "truncated":
        path.write_bytes(_state_file(tmp_path)[:3000])
    elif kind == "a list":
        torch.save([1, 2, 3], str(path))
    elif kind == "a dict of other things":
        torch.save({"epoch": 1, "weights": torch.ones(2)}, str(path))
    else:
        path.write_bytes(pickle.dumps({"epoch": 1, "model": os.getcwd}))
    capsys.readouterr()
    assert main(["train-teacher", "--out", str(out), "--epochs", "2", "--resume", *QUICK]) == 1
    err = err_line(capsys)
    assert str(path) in err and "delete it to start this model over, or run without --resume" in err
    assert "weights_only" not in err and "Traceback" not in err


def test_out_that_cannot_be_a_folder(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train-teacher", "--out", str(afile), *QUICK]) == 1
    assert f"--out {afile} is a file, not a folder" in err_line(capsys)

    real = os.makedirs

    def read_only(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)
    monkeypatch.setattr(os, "makedirs", read_only)
    assert main(["train-teacher", "--out", str(tmp_path / "ro" / "run"), *QUICK]) == 1
    assert "cannot create the output folder (Read-only file system)" in err_line(capsys)


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    out = str(tmp_path / "o")
    assert main(["train-teacher", "--out", out, *QUICK]) == 1
    err = err_line(capsys)
    assert "teacher_config.json: No space left on device; free some space, or choose another --out" in err


@pytest.mark.parametrize("device,match", [("gpu7", "--device 'gpu7' is not a device name"),
                                          ("meta", "--device meta holds no data"),
                                          ("cuda", "--device cuda: no CUDA GPU is available here"),
                                          ("cuda:3", "--device cuda:3: no CUDA GPU")])
def test_device_that_does_not_exist_here(tmp_path, capsys, device, match):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["train-teacher", "--out", str(tmp_path), "--device", device, *QUICK]) == 1
    assert match in err_line(capsys)
    assert not os.path.exists(tmp_path / "teacher_config.json")
