"""Students trained in another precision (or with another bank dtype) against the fp32 students of
the same recipe: per model and metric, mean ± std over the seeds of each study, the difference of
the means (accuracy points) and whether it is inside the seed noise, two ways:

- unpaired: |diff| < 2 * sqrt(s_a^2/n_a + s_b^2/n_b) (two standard errors of the difference of two means);
- paired by seed (the two studies' runs of one seed share the split, the initialisation and the
  data order): the mean of the per-seed differences ± the 95 % half-width of Student's t with n - 1
  degrees of freedom, as ``gacd-fast study`` compares GACD with its baselines (``study.compare``).

Prints a markdown table and writes compare_<name>.json next to this file.

    python docs/results/mixed_precision/compare_studies.py runs/i20/study_digits_fp32 runs/i20/study_digits_bf16 \
        --name digits_bf16
"""
from __future__ import annotations

import argparse
import json
import math
import os

from gacd_fast.distill.study import compare

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("clean", "pgd20", "cw", "autoattack", "probe_clean", "probe_pgd20")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference", help="study folder of the fp32 runs (study.json)")
    ap.add_argument("other", help="study folder of the runs compared with it")
    ap.add_argument("--name", required=True, help="name of the comparison (compare_<name>.json)")
    ap.add_argument("--metrics", nargs="+", default=list(METRICS))
    args = ap.parse_args()
    docs = [json.load(open(os.path.join(d, "study.json"))) for d in (args.reference, args.other)]
    a, b = (doc["summary"] for doc in docs)
    seeds = sorted(set(docs[0]["runs"]) & set(docs[1]["runs"]))
    per_seed = {seed: docs[0]["runs"][seed] + [{**r, "model": r["model"] + "@other"} for r in docs[1]["runs"][seed]]
                for seed in seeds}
    rows = []
    print(f"| model | metric | {os.path.basename(args.reference)} | {os.path.basename(args.other)} | diff | 2 SE | "
          f"unpaired | paired diff ± 95 % ({len(seeds)} seeds) | paired |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in a:
        if model not in b:
            continue
        paired = {c["metric"]: c for c in compare(per_seed, [model + "@other"], [model])}
        for m in args.metrics:
            if m not in a[model] or m not in b[model]:
                continue
            sa, sb = a[model][m], b[model][m]
            diff = 100 * (sb["mean"] - sa["mean"])
            two_se = 200 * math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
            verdict = "inside noise" if abs(diff) <= two_se else "beyond noise"
            p = paired.get(m)
            p_text, p_verdict = "", ""
            if p is not None and p["half_width"] is not None:
                p_text = f"{100 * p['diff']:+.1f} ± {100 * p['half_width']:.1f}"
                p_verdict = "beyond noise" if p["outside"] else "inside noise"
            rows.append(dict(model=model, metric=m, reference=sa, other=sb, diff_points=diff, two_se_points=two_se,
                             verdict=verdict, paired=p, paired_verdict=p_verdict or None))
            print(f"| {model} | {m} | {100 * sa['mean']:.1f} ± {100 * sa['std']:.1f} | {100 * sb['mean']:.1f} ± "
                  f"{100 * sb['std']:.1f} | {diff:+.1f} | {two_se:.1f} | {verdict} | {p_text} | {p_verdict} |")
    out = os.path.join(HERE, f"compare_{args.name}.json")
    with open(out, "w") as f:
        json.dump({"reference": args.reference, "other": args.other, "seeds": seeds, "rows": rows}, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
