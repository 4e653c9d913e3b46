"""Mean GACD-loss curve per bank variant of variants_digits.jsonl (seeds averaged), with log(K+1):

    python docs/results/bank_variants/plot_curves.py   # writes curves_digits.png beside this file
"""
import json
import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
curves: dict[str, list[list[float]]] = {}
for line in open(os.path.join(here, "variants_digits.jsonl")):
    row = json.loads(line)
    if row["curve"]:
        curves.setdefault(row["v"], []).append(row["curve"])
fig, ax = plt.subplots(figsize=(8, 4.5))
for name, cs in curves.items():
    mean = [sum(c[i] for c in cs) / len(cs) for i in range(len(cs[0]))]
    ax.plot(range(1, len(mean) + 1), mean, marker=".", label=f"{name} ({len(cs)} seeds)",
            ls="--" if "head=train" in name else "-")
ax.axhline(math.log(1025), color="black", lw=1, ls=":", label="log(K+1), K = 1024 (memory, queue)")
ax.axhline(math.log(64), color="gray", lw=1, ls=":", label="log(K+1), K = 63 (batch)")
ax.set_xlabel("epoch")
ax.set_ylabel("GACD loss (feature-only student)")
ax.set_title("digits: GACD loss by bank variant (dashed: trained teacher head)")
ax.grid(alpha=0.3)
ax.legend(fontsize=7, loc="lower right")
fig.tight_layout()
fig.savefig(os.path.join(here, "curves_digits.png"), dpi=110)
