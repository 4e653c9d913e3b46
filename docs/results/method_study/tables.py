"""Markdown tables of a `gacd-fast study` result (docs/method_study.md and the README quote them).

    python docs/results/method_study/tables.py docs/results/mnist5k_methods/study.json

prints the mean ± std table of every model and, per GACD student, its paired difference to each
baseline (mean over seeds ± the 95% t half-width; **bold** where it is outside the seed noise).
"""
import json
import sys

COLUMNS = ("clean", "pgd20", "cw", "autoattack", "probe_pgd20", "transfer_clean", "transfer_pgd20", "cka",
           "knn_agree", "transfer_cka")
RATIOS = ("cka", "knn_agree", "transfer_cka")
DIFFS = ("clean", "pgd20", "cw", "autoattack", "probe_pgd20", "transfer_pgd20", "cka", "knn_agree")


def cell(s, col):
    if s is None:
        return "-"
    return f"{s['mean']:.3f} ± {s['std']:.3f}" if col in RATIOS else f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"


def main(path):
    doc = json.load(open(path))
    summary, comps = doc["summary"], doc.get("comparisons", [])
    cols = [c for c in COLUMNS if any(c in m for m in summary.values())]
    print("| model | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for model, metrics in summary.items():
        print(f"| {model} | " + " | ".join(cell(metrics.get(c), c) for c in cols) + " |")
    print()
    groups = {}
    for c in comps:
        groups.setdefault(c["model"], {}).setdefault(c["baseline"], {})[c["metric"]] = c
    for model, bases in groups.items():
        metrics = [m for m in DIFFS if any(m in b for b in bases.values())]
        print(f"{model} minus each baseline (n = {next(iter(next(iter(bases.values())).values()))['n']} seeds):\n")
        print("| baseline | " + " | ".join(metrics) + " |")
        print("|---|" + "---|" * len(metrics))
        for base, cs in bases.items():
            cells = []
            for m in metrics:
                c = cs.get(m)
                if c is None:
                    cells.append("-")
                    continue
                k, f = (1, ".3f") if m in RATIOS else (100, ".1f")
                text = f"{k * c['diff']:+{f}} ± {k * c['half_width']:{f}}" if c["half_width"] is not None else f"{k * c['diff']:+{f}}"
                cells.append(f"**{text}**" if c["outside"] else text)
            print(f"| {base} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)
