"""gacd-fast study: mean +- std over seeds, its files, and the demo's seed-noise statement."""
import json
import math
import os

import pytest

from gacd_fast.cli import main
from gacd_fast.distill.pipeline import gacd_chance, student_runs
from gacd_fast.distill.study import compare, format_comparisons, format_summary, noise_report, summarize, write_study

ROWS = {
    0: [{"model": "natural", "clean": 0.90, "pgd20": 0.00, "cka": 0.8, "eval_s": 1.0},
        {"model": "gacd", "clean": 0.95, "pgd20": 0.50, "probe_pgd20": 0.40, "cka": 0.9, "eval_s": 1.0}],
    1: [{"model": "natural", "clean": 0.92, "pgd20": 0.02, "cka": 0.7, "eval_s": 1.0},
        {"model": "gacd", "clean": 0.97, "pgd20": 0.56, "probe_pgd20": 0.46, "cka": 0.9, "eval_s": 1.0}],
}


def test_summarize_mean_and_sample_std():
    s = summarize(ROWS)
    assert set(s) == {"natural", "gacd"} and "eval_s" not in s["gacd"]
    assert s["gacd"]["pgd20"]["mean"] == pytest.approx(0.53)
    assert s["gacd"]["pgd20"]["std"] == pytest.approx(math.sqrt(2 * 0.03 ** 2))  # ddof 1
    assert s["natural"]["clean"]["values"] == [0.90, 0.92] and s["natural"]["clean"]["n"] == 2
    assert summarize({0: ROWS[0]})["gacd"]["clean"]["std"] == 0.0
    table = format_summary(s, "t")
    assert "53.0 ± 4.2" in table and "probe_pgd20" in table


def test_write_study_files(tmp_path):
    paths = write_study(summarize(ROWS), ROWS, str(tmp_path), config={"seeds": [0, 1]}, title="x")
    doc = json.load(open(paths["json"]))
    assert set(doc) == {"config", "versions", "summary", "comparisons", "runs"} and set(doc["runs"]) == {"0", "1"}
    lines = open(paths["csv"]).read().splitlines()
    assert lines[0] == "model,metric,mean,std,n,values" and any(l.startswith("gacd,pgd20,0.53,") for l in lines)
    assert os.path.getsize(paths["png"]) > 0


def test_noise_report_says_inside_or_beyond():
    rows = [{"model": "gacd", "clean": 0.95, "pgd20": 0.50}, {"model": "ard", "clean": 0.94, "pgd20": 0.48},
            {"model": "natural", "clean": 0.97, "pgd20": 0.0}]
    text = noise_report(rows, "digits")
    assert "ard: clean -1.0 (noise), pgd20 -2.0 (noise)" in text
    assert "natural: clean +2.0 (beyond noise), pgd20 -50.0 (beyond noise)" in text  # clean: std 0.5
    assert "not measured" in noise_report(rows, "cifar10")
    feature = [{**rows[0], "probe_pgd20": 0.55}, {"model": "gacd_feature", "clean": 0.1, "pgd20": 0.01, "probe_pgd20": 0.5}]
    text = noise_report(feature, "digits", probe_only=("gacd_feature",))
    assert text.splitlines()[-1].endswith("gacd_feature: probe_pgd20 -5.0 (noise)")  # its classifier is never trained


def test_student_runs_and_chance():
    assert student_runs(["natural", "gacd"], ["memory", "queue"]) == [
        ("natural", "natural", "memory"), ("gacd_memory", "gacd", "memory"), ("gacd_queue", "gacd", "queue")]
    assert student_runs(["gacd"], ["batch"]) == [("gacd", "gacd", "batch")]
    assert gacd_chance({"method": "gacd", "bank": "memory", "num_negatives": 1023}) == pytest.approx(math.log(1024))
    assert gacd_chance({"method": "gacd_feature", "bank": "batch", "batch_size": 64}) == pytest.approx(math.log(64))
    assert gacd_chance({"method": "ard"}) is None


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    out = str(tmp_path / "study")
    assert main(["study", "--out", out, "--seeds", "0", "1", "--methods", "natural", "rslad", "iad", "adaad",
                 "gacd_guided", "gacd_feature", "--banks", "memory", "queue", "--teacher-epochs", "1",
                 "--student-epochs", "1", "--attack-steps", "1", "--train-limit", "80", "--test-limit", "24",
                 "--probe-epochs", "1", "--autoattack", "6", "--no-progress"]) == 0
    doc = json.load(open(os.path.join(out, "study.json")))
    assert set(doc["summary"]) == {"teacher", "natural", "rslad", "iad", "adaad", "gacd_guided_memory", "gacd_guided_queue",
                                   "gacd_feature_memory", "gacd_feature_queue"}
    assert doc["summary"]["gacd_feature_queue"]["probe_pgd20"]["n"] == 2
    assert doc["summary"]["adaad"]["autoattack"]["n"] == 2 and doc["runs"]["0"][0]["autoattack_n"] == 6
    # every GACD student against every baseline, paired over the 2 seeds
    pairs = {(c["model"], c["baseline"]) for c in doc["comparisons"]}
    assert pairs == {(g, b) for g in ("gacd_guided_memory", "gacd_guided_queue", "gacd_feature_memory", "gacd_feature_queue")
                     for b in ("teacher", "natural", "rslad", "iad", "adaad")}
    assert all(c["n"] == 2 for c in doc["comparisons"]) and os.path.getsize(os.path.join(out, "comparisons.csv")) > 0
    assert {c["metric"] for c in doc["comparisons"] if c["model"] == "gacd_feature_queue"} >= {"probe_pgd20", "cka"}
    for f in ("study.csv", "study.png", "seed0/results.json", "seed1/training_curves.png"):
        assert os.path.getsize(os.path.join(out, f)) > 0, f
    # --teacher: every seed shares a trained teacher instead of training its own
    again = str(tmp_path / "shared")
    assert main(["study", "--out", again, "--seeds", "3", "--methods", "natural", "--teacher",
                 os.path.join(out, "seed0", "teacher.pt"), "--student-epochs", "1", "--train-limit", "80",
                 "--test-limit", "24", "--probe-epochs", "1", "--no-progress"]) == 0
    assert not os.path.exists(os.path.join(again, "seed3", "teacher.pt"))
    # the shared teacher's split (seed 0), not seed 3's: no run may test on the teacher's training images
    assert json.load(open(os.path.join(again, "seed3", "natural_config.json")))["split_seed"] == 0
    assert set(json.load(open(os.path.join(again, "study.json")))["summary"]) == {"teacher", "natural"}


def test_study_needs_seeds(tmp_path):
    with pytest.raises(SystemExit):  # argparse: --seeds needs values
        main(["study", "--seeds"])
    cfg = tmp_path / "c.json"
    cfg.write_text('{"seeds": []}')
    assert main(["study", "--config", str(cfg)]) == 2  # a bad configuration, named


def test_compare_pairs_by_seed_with_a_t_interval():
    """diff = mean over seeds of (model - baseline), its 95% half-width t(n-1) std / sqrt(n), outside = |diff| > it."""
    runs = {s: [{"model": "gacd", "pgd20": g, "cka": 0.9}, {"model": "ard", "pgd20": a, "cka": 0.9}]
            for s, (g, a) in enumerate([(0.60, 0.50), (0.62, 0.50), (0.61, 0.52)])}
    (pgd, cka) = compare(runs, ["gacd"], ["ard"])
    d = [0.10, 0.12, 0.09]
    mean = sum(d) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert (pgd["metric"], pgd["n"]) == ("pgd20", 3) and pgd["diff"] == pytest.approx(mean)
    assert pgd["std"] == pytest.approx(std) and pgd["half_width"] == pytest.approx(4.303 * std / math.sqrt(3))
    assert pgd["outside"] is True and cka["diff"] == pytest.approx(0.0) and cka["outside"] is False
    noisy = {s: [{"model": "gacd", "pgd20": g}, {"model": "ard", "pgd20": 0.5}] for s, g in enumerate([0.4, 0.7, 0.5])}
    assert compare(noisy, ["gacd"], ["ard"])[0]["outside"] is False  # +0.033 with a half-width of 0.38
    one = compare({0: runs[0]}, ["gacd"], ["ard"])[0]
    assert one["half_width"] is None and one["outside"] is None
    # a feature-only student is compared on its probe columns; a metric missing on one side is skipped
    feat = {0: [{"model": "f", "clean": 0.1, "probe_pgd20": 0.5}, {"model": "ard", "clean": 0.9, "probe_pgd20": 0.4}]}
    assert [c["metric"] for c in compare(feat, ["f"], ["ard"], probe_only=("f",))] == ["probe_pgd20"]
    text = format_comparisons(compare(runs, ["gacd"], ["ard"]))
    assert text == f"gacd - ard (n=3): pgd20 +{100 * mean:.1f} ± {100 * 4.303 * std / math.sqrt(3):.1f} OUTSIDE; cka +0.000 ± 0.000 inside"


def test_study_files_hold_the_comparisons(tmp_path):
    comps = compare(ROWS, ["gacd"], ["natural"])
    paths = write_study(summarize(ROWS), ROWS, str(tmp_path), config={}, comparisons=comps)
    assert json.load(open(paths["json"]))["comparisons"] == comps
    assert open(paths["comparisons"]).readline().strip() == "model,baseline,metric,diff,std,n,half_width,outside"
    s = summarize({0: [{"model": "t", "clean": 0.9, "knn_agree": 0.5, "transfer_cka": 0.7, "transfer_pgd20": 0.2}]})
    header = format_summary(s).splitlines()[0].split()
    assert header == ["model", "clean", "transfer_pgd20", "knn_agree", "transfer_cka"]  # ratios last
    assert "0.500 ± 0.000" in format_summary(s)
