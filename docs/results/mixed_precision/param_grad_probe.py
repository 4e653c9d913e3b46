"""Does an attack gain from its model's parameters not requiring grad? ResNet-18 (eval mode) forward
and input-gradient backward, as one PGD step runs it, with the parameters requiring grad and not,
alternated in paired rounds (the order swapped every round); the gradients are compared to the bit.
Prints one line per setting and writes param_grad_probe.json next to this file.

    PYTHONPATH=. python docs/results/mixed_precision/param_grad_probe.py --threads 1 2 --batch 32 --rounds 15
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from gacd_fast.distill.models import build_model

HERE = os.path.dirname(os.path.abspath(__file__))


def one_pass(model, x, y, requires_grad: bool) -> tuple[float, torch.Tensor]:
    for p in model.parameters():
        p.requires_grad_(requires_grad)
    xx = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    grad = torch.autograd.grad(F.cross_entropy(model(xx)[1], y), xx)[0]
    return time.perf_counter() - t0, grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=os.path.join(HERE, "param_grad_probe.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3).eval()
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(10, (args.batch,))
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        same = torch.equal(one_pass(model, x, y, True)[1], one_pass(model, x, y, False)[1])
        with_grad, without, ratios = [], [], []
        for r in range(args.rounds):
            t = {req: one_pass(model, x, y, req)[0] for req in ((True, False) if r % 2 == 0 else (False, True))}
            with_grad.append(t[True])
            without.append(t[False])
            ratios.append(t[False] / t[True])
        q = statistics.quantiles(ratios, n=4)
        row = {"threads": threads, "batch": args.batch, "rounds": args.rounds, "same_gradient": same,
               "ms_params_require_grad": 1e3 * statistics.median(with_grad),
               "ms_params_frozen": 1e3 * statistics.median(without),
               "paired_ratio_median": statistics.median(ratios), "paired_ratio_q1": q[0], "paired_ratio_q3": q[2]}
        rows.append(row)
        print(f"threads {threads}, B={args.batch}: parameters requiring grad {row['ms_params_require_grad']:.0f} ms, "
              f"frozen {row['ms_params_frozen']:.0f} ms, paired ratio {row['paired_ratio_median']:.3f} "
              f"(quartiles {q[0]:.3f}-{q[2]:.3f}), same gradient: {same}", flush=True)
    doc = {"command": "PYTHONPATH=. python " + shlex.join(sys.argv), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
