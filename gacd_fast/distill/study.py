"""Seeds and spread: the mean and standard deviation of every metric over repeated runs
(``gacd-fast study``), the paired comparison of GACD with every baseline against the seed noise,
and the demo's statement of which differences are inside the seed noise.

study.json::

    {"config": {...}, "versions": {...},
     "summary": {model: {metric: {"mean", "std", "n", "values"}}},
     "comparisons": [{"model", "baseline", "metric", "diff", "std", "n", "half_width", "outside"}],
     "runs": {seed: [result rows as in results.json]}}

study.csv is the long form of "summary" (model, metric, mean, std, n, values), comparisons.csv
that of "comparisons". std is the sample standard deviation (ddof 1; 0 for a single seed).
A comparison pairs the two models' runs of the same seed (same data split and, per seed, the same
teacher): diff is the mean over seeds of model - baseline, std the std of those per-seed
differences, half_width the half-width of its 95% confidence interval (Student's t with n - 1
degrees of freedom times std / sqrt(n)), and outside says whether |diff| > half_width: the
difference is outside the seed noise (a paired two-sided t-test at 5%).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from .atomic import atomic_write_text
from .report import RATIO_COLS, _pyplot, _save, plots_available, versions

# Accuracy columns of a result row (fractions), in display order; probe_* and transfer_* follow.
ACC_METRICS = ("clean", "fgsm", "pgd20", "cw", "autoattack")

# Seed-to-seed standard deviation (accuracy points) of one run, measured by `gacd-fast study` over seeds
# 0, 1, 2 (docs/results/digits/study.json: the root mean square of the per-model stds; the feature-only
# students' classifier columns left out, their classifier is never trained). The demo uses it to say
# whether a difference of two single-seed results is inside the noise. dataset -> metric; "*": any other.
SEED_STD_POINTS: dict[str, dict[str, float]] = {
    "digits": {"clean": 0.5, "fgsm": 2.4, "pgd20": 2.7, "cw": 2.3, "probe_clean": 0.4, "probe_pgd20": 2.5,
               "transfer_clean": 1.1, "transfer_pgd20": 4.1, "*": 4.1},
}


# The 97.5% quantile of Student's t with 1, 2, ..., 30 degrees of freedom (two-sided 95% intervals);
# above 30 the normal quantile 1.96 is within 2%.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# Metrics a comparison reports: a model with a classifier, and a feature-only one (judged by its probes).
COMPARED = ("clean", "pgd20", "cw", "autoattack", "probe_pgd20", "transfer_clean", "transfer_pgd20", "cka",
            "knn_agree", "transfer_cka")
COMPARED_PROBE_ONLY = ("probe_clean", "probe_pgd20", "transfer_clean", "transfer_pgd20", "cka", "knn_agree",
                       "transfer_cka")


def summarize(per_seed: dict[int, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """model -> metric -> {mean, std, n, values} over the seeds (numeric columns only)."""
    values: dict[str, dict[str, list[float]]] = {}
    for rows in per_seed.values():
        for row in rows:
            for k, v in row.items():
                if k in ("model", "eval_s", "autoattack_n") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                values.setdefault(row["model"], {}).setdefault(k, []).append(float(v))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, metrics in values.items():
        out[model] = {}
        for k, vs in metrics.items():
            mean = sum(vs) / len(vs)
            std = math.sqrt(sum((v - mean) ** 2 for v in vs) / (len(vs) - 1)) if len(vs) > 1 else 0.0
            out[model][k] = {"mean": mean, "std": std, "n": len(vs), "values": vs}
    return out


def _metric_columns(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    present = {k for m in summary.values() for k in m}
    cols = [c for c in ACC_METRICS if c in present]
    cols += sorted(c for c in present if c.startswith("probe_"))
    cols += sorted(c for c in present if c.startswith("transfer_") and c not in RATIO_COLS)
    return cols + [c for c in RATIO_COLS if c in present]


def compare(per_seed: dict[int, list[dict[str, Any]]], models: list[str], baselines: list[str], *,
            probe_only: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Each of ``models`` against each of ``baselines``, per metric (COMPARED, or COMPARED_PROBE_ONLY
    for a model in ``probe_only``), paired by seed (see the module doc): a list of
    {"model", "baseline", "metric", "diff", "std", "n", "half_width", "outside"}; diff, std and
    half_width in the metric's unit (fractions), half_width None and outside None for one seed."""
    by_seed = {seed: {r["model"]: r for r in rows} for seed, rows in per_seed.items()}
    out = []
    for model in models:
        for base in baselines:
            for metric in COMPARED_PROBE_ONLY if model in probe_only else COMPARED:
                diffs = [float(runs[model][metric]) - float(runs[base][metric]) for runs in by_seed.values()
                         if _number(runs.get(model, {}).get(metric)) and _number(runs.get(base, {}).get(metric))]
                if not diffs:
                    continue
                n = len(diffs)
                mean = sum(diffs) / n
                std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else 0.0
                half = T_975[min(n - 1, len(T_975)) - 1] * std / math.sqrt(n) if n > 1 else None
                out.append({"model": model, "baseline": base, "metric": metric, "diff": mean, "std": std, "n": n,
                            "half_width": half, "outside": None if half is None else abs(mean) > half})
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def format_comparisons(comparisons: list[dict[str, Any]], title: str = "") -> str:
    """One line per (model, baseline): each metric's difference ± its 95% half-width and whether it
    is outside the seed noise; accuracies in points, CKA and 10-NN agreement as ratios."""
    lines = [title] if title else []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for c in comparisons:
        groups.setdefault((c["model"], c["baseline"]), []).append(c)
    for (model, base), cs in groups.items():
        cells = []
        for c in cs:
            scale, fmt = (1, ".3f") if c["metric"] in RATIO_COLS else (100, ".1f")
            if c["half_width"] is None:
                cells.append(f"{c['metric']} {scale * c['diff']:+{fmt}} (1 seed)")
            else:
                verdict = "OUTSIDE" if c["outside"] else "inside"
                cells.append(f"{c['metric']} {scale * c['diff']:+{fmt}} ± {scale * c['half_width']:{fmt}} {verdict}")
        lines.append(f"{model} - {base} (n={cs[0]['n']}): " + "; ".join(cells))
    return "\n".join(lines)


def format_summary(summary: dict[str, dict[str, dict[str, Any]]], title: str = "") -> str:
    """Fixed-width table of mean +- std: accuracies in points, CKA as a ratio."""
    cols = _metric_columns(summary)
    width = max([len(m) for m in summary] + [5])
    lines = [title] if title else []
    lines.append(f"{'model':<{width}}  " + "  ".join(f"{c:>14}" for c in cols))
    for model, metrics in summary.items():
        cells = []
        for c in cols:
            s = metrics.get(c)
            if s is None:
                cells.append(f"{'-':>14}")
            elif c in RATIO_COLS:
                cells.append(f"{s['mean']:.3f} ± {s['std']:.3f}".rjust(14))
            else:
                cells.append(f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}".rjust(14))
        lines.append(f"{model:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def write_study(summary: dict[str, Any], per_seed: dict[int, list[dict[str, Any]]], out_dir: str, *,
                config: dict[str, Any], title: str = "",
                comparisons: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """study.json, study.csv, comparisons.csv (with ``comparisons``) and study.png in ``out_dir``;
    returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"study.{k}") for k in ("json", "csv", "png")}
    doc = {"config": config, "versions": versions(), "summary": summary, "comparisons": comparisons or [],
           "runs": {str(k): v for k, v in per_seed.items()}}
    atomic_write_text(paths["json"], json.dumps(doc, indent=2) + "\n")
    if comparisons:
        paths["comparisons"] = os.path.join(out_dir, "comparisons.csv")
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(comparisons[0]))
        w.writeheader()
        w.writerows(comparisons)
        atomic_write_text(paths["comparisons"], buf.getvalue())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "metric", "mean", "std", "n", "values"])
    for model, metrics in summary.items():
        for k, s in metrics.items():
            w.writerow([model, k, f"{s['mean']:.6g}", f"{s['std']:.6g}", s["n"], " ".join(f"{v:.6g}" for v in s["values"])])
    atomic_write_text(paths["csv"], buf.getvalue())
    if plots_available():
        plot_study(summary, paths["png"], title)
    else:
        del paths["png"]
    return paths


def plot_study(summary: dict[str, dict[str, dict[str, Any]]], path: str, title: str = "") -> None:
    """Grouped bars of the accuracy metrics per model, mean with +- std error bars."""
    plt = _pyplot()
    cols = [c for c in _metric_columns(summary) if c not in RATIO_COLS]
    models = list(summary)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(models) + 2), 4.5))
    width = 0.8 / max(1, len(cols))
    for j, c in enumerate(cols):
        means = [100 * summary[m][c]["mean"] if c in summary[m] else 0.0 for m in models]
        stds = [100 * summary[m][c]["std"] if c in summary[m] else 0.0 for m in models]
        ax.bar([i + j * width for i in range(len(models))], means, width, yerr=stds, capsize=2, label=c)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(models))])
    ax.set_xticklabels(models, rotation=20)
    ax.set_ylabel("accuracy (%), mean ± std over seeds")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(cols), 5), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    ax.set_title(title or "mean ± std over seeds")
    _save(fig, path)


def noise_std(dataset: str, metric: str) -> float | None:
    """The measured seed std (points) of ``metric`` on ``dataset``; None when not measured."""
    table = SEED_STD_POINTS.get(dataset)
    if table is None:
        return None
    return table.get(metric, table.get("*"))


def noise_report(rows: list[dict[str, Any]], dataset: str, reference: str = "gacd",
                 probe_only: tuple[str, ...] = ()) -> str:
    """For a single-seed table: each model's difference to ``reference`` per accuracy metric, and
    whether it is inside the seed noise: |d| < 2 * sqrt(2) * std, the std of a single run measured
    by `gacd-fast study` (two independent runs differ by sqrt(2) std on average; 2 of those is ~95%).
    Models in ``probe_only`` (feature-only students: their classifier is never trained) are compared
    on the probe columns alone."""
    by_name = {r["model"]: r for r in rows}
    ref = by_name.get(reference)
    metrics = [c for c in ("clean", "pgd20", "cw", "probe_pgd20") if ref is not None and isinstance(ref.get(c), float)]
    if ref is None or not metrics:
        return f"[demo] no {reference!r} row: no noise statement"
    lines = [f"[demo] single seed; differences to {reference} in accuracy points; 'noise' = inside 2*sqrt(2)*std "
             "of one run (std measured over 3 seeds by gacd-fast study):"]
    for name, row in by_name.items():
        if name == reference:
            continue
        parts = []
        for c in metrics:
            if not isinstance(row.get(c), float) or (name in probe_only and not c.startswith("probe_")):
                continue
            d = 100 * (row[c] - ref[c])
            std = noise_std(dataset, c)
            verdict = "seed std not measured" if std is None else ("noise" if abs(d) < 2 * math.sqrt(2) * std else "beyond noise")
            parts.append(f"{c} {d:+.1f} ({verdict})")
        lines.append(f"[demo]   {name}: " + ", ".join(parts))
    return "\n".join(lines)
