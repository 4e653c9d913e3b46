"""A study's summary from the per-seed results of `gacd-fast study` (its seed<N>/results.json), for
seeds whose study did not reach its end: mean ± std over the seeds given and the paired
comparisons of every GACD student with every baseline, as `gacd-fast study` computes them
(gacd_fast.distill.study). Writes study.json/csv/png and comparisons.csv to OUT.

    python docs/results/method_study/from_seeds.py OUT runs/study_mnist5k/seed0 runs/study_mnist5k/seed1 ...
"""
import json
import os
import sys

from gacd_fast.distill.method_registry import STUDENT_METHODS
from gacd_fast.distill.study import compare, format_comparisons, format_summary, summarize, write_study


def main(out, seed_dirs):
    per_seed = {}
    for d in seed_dirs:
        doc = json.load(open(os.path.join(d, "results.json")))
        per_seed[int(os.path.basename(os.path.normpath(d)).removeprefix("seed"))] = [
            {"model": name, **metrics} for name, metrics in doc["methods"].items()]
    names = [r["model"] for r in next(iter(per_seed.values()))]
    students = [n for n in names if n in STUDENT_METHODS]
    comparisons = compare(per_seed, [n for n in students if STUDENT_METHODS[n].uses_bank],
                          ["teacher"] + [n for n in students if not STUDENT_METHODS[n].uses_bank],
                          probe_only=tuple(n for n in students if STUDENT_METHODS[n].probe_only))
    summary = summarize(per_seed)
    config = {"from_seeds": [os.path.abspath(d) for d in seed_dirs], "dataset": doc["dataset"]}
    write_study(summary, per_seed, out, config=config, title=f"{doc['dataset']}: seeds {sorted(per_seed)}",
                comparisons=comparisons)
    print(format_summary(summary, f"{doc['dataset']}: mean +- std over seeds {sorted(per_seed)}"))
    print(format_comparisons(comparisons, "differences to each baseline, paired by seed"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
