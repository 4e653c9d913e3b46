"""Turn benchmark CSVs into PNGs: per op and metric, value vs size, one line per provider; the
whole-step comparisons (ops ``pgd10_*`` and ``train_step_*``: one shape, several precisions) as one
bar chart per op and metric, a bar per variant (provider and dtype).

    python benchmarks/plot.py benchmarks/results/*.csv     # writes benchmarks/plots/*.png
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PLOTS = Path(__file__).resolve().parent / "plots"
SIZE_KEYS = ("K", "N", "M", "B")  # the first that varies within a group is the x axis
WHOLE_STEP_OPS = ("pgd10_", "train_step_")  # variants side by side: bars, dtypes in one chart


def load(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        with open(p, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def plot_bars(rows: list[dict], out: Path = PLOTS) -> list[Path]:
    """One bar chart per whole-step op, shape and metric: a bar per variant (provider, dtype), and
    per run (its start time under the bar) when the CSVs hold several runs of the op; a log scale
    when the bars span more than 20x (an emulated precision beside native ones)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["metric"], r["B"], r["K"], r["device"])].append(r)
    written = []
    for (op, metric, b, k, device), grp in groups.items():
        fig, ax = plt.subplots(figsize=(max(6.4, 0.8 * len(grp)), 3.6))
        runs = sorted({r["timestamp"] for r in grp})
        labels = [f"{r['provider']}\n{r['dtype']}" + (f"\n{r['timestamp'][11:16]}" if len(runs) > 1 else "") for r in grp]
        values = [float(r["p50"]) for r in grp]
        err = [[v - float(r["p20"]) for v, r in zip(values, grp)], [float(r["p80"]) - v for v, r in zip(values, grp)]]
        colors = [f"C{runs.index(r['timestamp']) % 10}" for r in grp]  # a colour per run
        ax.bar(range(len(grp)), values, yerr=err, capsize=3, color=colors)
        if min(values) > 0 and max(values) / min(values) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(grp)), labels, fontsize=7)
        ax.set_ylabel(f"{metric} ({grp[0]['unit']})")
        shape = " ".join(f"{n}={v}" for n, v in (("B", b), ("K", k)) if v)
        ax.set_title(f"{op} {shape}\n{device}", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"{op}_{'_'.join(p for p in (f'B{b}', f'K{k}' if k else '') if p)}_{metric}_{'cuda' if 'cpu' not in device else 'cpu'}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def plot(rows: list[dict], out: Path = PLOTS) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    whole = [r for r in rows if r["op"].startswith(WHOLE_STEP_OPS)]
    rows = [r for r in rows if not r["op"].startswith(WHOLE_STEP_OPS)]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["op"], r["metric"], r["mode"], r["dtype"], r["device"])].append(r)
    written = []
    for (op, metric, mode, dtype, device), grp in groups.items():
        x_key = next((k for k in SIZE_KEYS if len({r[k] for r in grp}) > 1), None) or next(
            (k for k in SIZE_KEYS if grp[0][k]), "B")
        fixed = {k: grp[0][k] for k in "BKMDN" if k != x_key and len({r[k] for r in grp}) == 1 and grp[0][k]}
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        by_provider: dict[str, list[dict]] = defaultdict(list)
        for r in grp:
            # one line per provider and per extra varying shape field (e.g. D, B)
            other = ",".join(f"{k}={r[k]}" for k in "BKMDN" if k != x_key and k not in fixed and r[k])
            by_provider[r["provider"] + (f" ({other})" if other else "")].append(r)
        for label, pts in sorted(by_provider.items()):
            pts = sorted(pts, key=lambda r: float(r[x_key] or 0))
            xs = [float(r[x_key] or 0) for r in pts]
            ys = [float(r["p50"]) for r in pts]
            lo = [y - float(r["p20"]) for y, r in zip(ys, pts)]
            hi = [float(r["p80"]) - y for y, r in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        if metric in ("time", "peak_memory"):
            ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(f"{metric} ({grp[0]['unit']})")
        ax.set_title(f"{op} {mode} {dtype} {' '.join(f'{k}={v}' for k, v in fixed.items())}\n{device}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        dev = "cuda" if "cpu" not in device else "cpu"
        path = out / f"{op}_{metric}_{mode}_{dtype}_{dev}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written + plot_bars(whole, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csvs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=PLOTS)
    args = ap.parse_args()
    for p in plot(load(args.csvs), args.out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
