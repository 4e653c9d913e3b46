"""Results: the printed table, results.json/.csv, curves.json and the plots (results.png,
robust_vs_eps.png, training_curves.png), all written atomically.

results.json::

    {"dataset": str, "eps": float, "device": str, "config": {...}, "versions": {...},
     "inputs": {name: sha256 of the file it was read from (teacher, checkpoints, --teacher-weights)},
     "methods": {name: {"clean", "fgsm", "pgd20", "cw", "cka", "knn_agree", "seconds",
                        "probe_clean", "probe_pgd20", "transfer_clean", "transfer_pgd20", "transfer_cka",
                        "autoattack", "autoattack_n"}}}

Accuracies are fractions in [0, 1]; "cka" is the linear CKA of the model's penultimate test
features to the teacher's and "knn_agree" their 10-nearest-neighbour agreement (both null without
a teacher); "seconds" the model's training wall time (null when its checkpoint does not say); the
probe keys (a linear probe on the frozen features, same task) unless evaluate ran with
--no-feature-probe; the transfer keys only when a transfer probe ran ("transfer_cka": linear CKA
to the teacher's features on the transfer task's test images); the autoattack keys (accuracy,
images used) only with --autoattack N. ``evaluate --resume`` (and a resumed demo or study) reuses
a results.json whose "inputs" and evaluation options are those of the new run instead of evaluating
again.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import platform
import warnings
from typing import Any

from .atomic import atomic_write, atomic_write_text

SKIP_COLS = ("eval_s",)
# similarity columns: ratios in [0, 1] shown as such (the other fractions are accuracies, shown in %)
RATIO_COLS = ("cka", "knn_agree", "transfer_cka")


def versions() -> dict[str, str | None]:
    """Versions of torch, triton (None when not installed), gacd_fast and python."""
    from importlib import metadata

    import torch

    import gacd_fast

    try:
        triton: str | None = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton, "gacd_fast": gacd_fast.__version__,
            "python": platform.python_version()}


def format_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """A fixed-width text table: accuracies in %, CKA as a ratio, seconds with one decimal."""
    if not rows:
        return "(no results)"
    cols = [c for c in rows[0] if c not in SKIP_COLS]
    for r in rows[1:]:
        cols += [c for c in r if c not in cols and c not in SKIP_COLS]

    def cell(v: Any, c: str) -> str:
        if isinstance(v, float):
            if c in RATIO_COLS:
                return f"{v:.4f}"
            if c == "seconds":
                return f"{v:.1f}"
            return f"{100 * v:.2f}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(c), c) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths)))
    out = [title] if title else []
    out += [line(cols), line(["-" * w for w in widths])] + [line(b) for b in body]
    out.append("(accuracies in %, cka = linear CKA of penultimate test features to the teacher's, knn_agree = "
               "their 10-NN agreement, transfer_cka = CKA on the transfer task, seconds = training wall time)")
    return "\n".join(out)


def results_document(rows: list[dict[str, Any]], *, dataset: str, eps: float, device: str,
                     config: dict[str, Any], inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """The results.json mapping (see the module doc)."""
    methods = {}
    for r in rows:
        entry = {k: v for k, v in r.items() if k != "model" and k not in SKIP_COLS}
        entry.setdefault("cka", None)
        entry.setdefault("seconds", None)
        methods[r["model"]] = entry
    return {"dataset": dataset, "eps": float(eps), "device": str(device), "config": config,
            "versions": versions(), "inputs": inputs or {}, "methods": methods}


def write_results(rows: list[dict[str, Any]], out_dir: str, *, dataset: str, eps: float, device: str,
                  config: dict[str, Any], title: str = "", sweep: dict[str, Any] | None = None,
                  histories: dict[str, list[dict[str, Any]]] | None = None,
                  chance: dict[str, float] | None = None, inputs: dict[str, str] | None = None) -> dict[str, str]:
    """results.json/.csv/.png, curves.json and, when there is data for them, robust_vs_eps.png
    (``sweep``: {"eps": [...], "attack": "pgd20", "accuracy": {name: [...]}}) and
    training_curves.png (``histories``: name -> per-epoch rows; ``chance``: name -> log(K+1), the
    contrastive loss of a student that cannot tell its positive from K negatives; ``inputs``: model
    name -> content hash of its file). Returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f"results.{k}") for k in ("json", "csv", "png")}
    doc = results_document(rows, dataset=dataset, eps=eps, device=device, config=config, inputs=inputs)
    atomic_write_text(paths["json"], json.dumps(doc, indent=2) + "\n")
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols and c not in SKIP_COLS]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(paths["csv"], buf.getvalue())
    paths["curves"] = os.path.join(out_dir, "curves.json")
    atomic_write_text(paths["curves"], json.dumps({"eps_sweep": sweep, "training": histories or {}}, indent=2) + "\n")
    if not plots_available():
        del paths["png"]
        return paths
    plot_results(rows, paths["png"], title=title)
    if sweep and sweep.get("accuracy"):
        paths["robust_vs_eps"] = os.path.join(out_dir, "robust_vs_eps.png")
        plot_eps_sweep(sweep, paths["robust_vs_eps"], title=title)
    if histories and any(histories.values()):
        paths["training_curves"] = os.path.join(out_dir, "training_curves.png")
        plot_training_curves(histories, paths["training_curves"], title=title, chance=chance)
    return paths


def plots_available() -> bool:
    """Whether matplotlib is installed (the [plots] extra). Without it the PNGs are skipped, with
    one warning per process; every JSON/CSV file is still written."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    warnings.warn("plots skipped: matplotlib is not installed (pip install 'gacd_fast[plots]')", stacklevel=3)
    return False


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> None:
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), binary=True)
    _pyplot().close(fig)


def plot_results(rows: list[dict[str, Any]], path: str, title: str = "") -> None:
    """Grouped bars of the accuracy columns per model, with CKA in a second panel when present."""
    plt = _pyplot()
    acc_cols = [c for c in rows[0] if (c in ("clean", "fgsm", "cw") or c.startswith("pgd") or c.startswith("transfer"))
                and c not in RATIO_COLS]
    has_cka = any(r.get("cka") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_cka else 1, figsize=(11 if has_cka else 8, 4),
                             gridspec_kw={"width_ratios": [3, 1]} if has_cka else None, squeeze=False)
    ax = axes[0][0]
    n, k = len(rows), len(acc_cols)
    width = 0.8 / max(1, k)
    for j, c in enumerate(acc_cols):
        ax.bar([i + j * width for i in range(n)], [100 * (r.get(c) or 0.0) for r in rows], width, label=c)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(n)])
    ax.set_xticklabels([r["model"] for r in rows], rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(acc_cols), loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    ax.set_title(title or "accuracy under attack")
    if has_cka:
        ax2 = axes[0][1]
        ax2.bar(range(n), [r.get("cka") or 0.0 for r in rows], color="gray")
        ax2.set_xticks(range(n))
        ax2.set_xticklabels([r["model"] for r in rows], rotation=60, fontsize=8)
        ax2.set_ylim(0, 1)
        ax2.set_title("linear CKA to teacher")
    _save(fig, path)


def plot_eps_sweep(sweep: dict[str, Any], path: str, title: str = "") -> None:
    """Robust accuracy (%) against the attack radius, one line per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, accs in sweep["accuracy"].items():
        ax.plot(sweep["eps"], [100 * a for a in accs], marker="o", label=name)
    if sweep.get("train_eps") is not None:
        ax.axvline(sweep["train_eps"], color="gray", ls=":", lw=1, label="eps of the run")
    ax.set_xlabel("L-inf eps")
    ax.set_ylabel(f"{sweep.get('attack', 'PGD')} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title((title + ": " if title else "") + "robust accuracy vs eps")
    _save(fig, path)


def plot_training_curves(histories: dict[str, list[dict[str, Any]]], path: str, title: str = "",
                         chance: dict[str, float] | None = None) -> None:
    """Training loss and training accuracy per epoch, one line per model; when a model logged a
    GACD term ("gacd_loss"), a third panel with that term and its chance level log(K+1) (dashed)."""
    plt = _pyplot()
    gacd = {n: h for n, h in histories.items() if h and "gacd_loss" in h[0]}
    fig, axes = plt.subplots(1, 3 if gacd else 2, figsize=(16 if gacd else 11, 4))
    ax1, ax2 = axes[0], axes[1]
    colors = {}
    for name, hist in histories.items():
        if not hist:
            continue
        ep = [r["epoch"] for r in hist]
        line, = ax1.plot(ep, [r["loss"] for r in hist], marker=".", label=name)
        colors[name] = line.get_color()
        ax2.plot(ep, [100 * r["train_acc"] for r in hist], marker=".", label=name, color=colors[name])
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    ax1.set_title("loss")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("training accuracy (%) (on the inputs trained on)")
    ax2.set_ylim(0, 100)
    ax2.set_title("train accuracy")
    if gacd:
        ax3 = axes[2]
        for name, hist in gacd.items():
            ax3.plot([r["epoch"] for r in hist], [r["gacd_loss"] for r in hist], marker=".", label=name, color=colors[name])
            if chance and name in chance:
                ax3.axhline(chance[name], color=colors[name], ls="--", lw=1)
        ax3.set_xlabel("epoch")
        ax3.set_ylabel("GACD contrastive term (dashed: log(K+1), chance)")
        ax3.set_ylim(bottom=0)
        ax3.set_title("GACD term")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    _save(fig, path)
