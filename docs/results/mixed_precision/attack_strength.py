"""Does a bf16 attack keep its strength? PGD-20 robust accuracy of trained models under the same
attack run in fp32 and in bf16 (``PGD(..., precision=)``): the same model, the same random starts
(one seeded generator per run, drawn in fp32 either way), the whole test set, accuracy of the
adversarial images judged in fp32. ``--layouts nchw channels_last`` also runs every precision with
the model and batches in channels_last (arm "fp32+cl"): the same question for the memory format.
Every arm is compared with the first one. Prints a table and writes attack_strength.json next to this file.

    PYTHONPATH=. python docs/results/mixed_precision/attack_strength.py runs/i20/digits_teacher/teacher.pt ...
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import warnings

import torch

from gacd_fast import PGD
from gacd_fast.attacks import logits_of
from gacd_fast.distill.config import EvaluateConfig, resolve
from gacd_fast.distill.data import iterate, load_dataset
from gacd_fast.distill.train import load_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))


def robust(model, test, *, eps, alpha, precision, layout, seed, batch_size=256):
    """Per-sample correctness [N] (bool) of the model on PGD-20 images, and the attack's seconds."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model.to(memory_format=fmt)
    gen = torch.Generator().manual_seed(seed)
    atk = PGD(model, eps, alpha, 20, generator=gen, precision=precision)
    out, t0 = [], time.time()
    for x, y, _ in iterate(test, batch_size):
        xa = atk(x.contiguous(memory_format=fmt), y)
        with torch.no_grad():
            out.append(logits_of(model(xa)).argmax(1) == y)
    return torch.cat(out), time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--layouts", nargs="+", default=["nchw"], choices=["nchw", "channels_last"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--limit", type=int, default=None,
                    help="attack a seeded subset of this many test images (default: the whole test set)")
    ap.add_argument("--out", default=os.path.join(HERE, "attack_strength.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*runs emulated on this CPU")
    arms = [(p, layout) for layout in args.layouts for p in args.precisions]
    labels = [p if layout == "nchw" else f"{p}+cl" for p, layout in arms]
    results = {}
    for path in args.checkpoints:
        model, meta = load_checkpoint(path)
        cfg = meta["config"]
        split = cfg.get("split_seed") if cfg.get("split_seed") is not None else cfg["seed"]
        ecfg = resolve(EvaluateConfig(dataset=cfg["dataset"]))  # the evaluation's eps and step of the dataset
        test = load_dataset(cfg["dataset"], cfg.get("data_dir"), seed=split).test.subset(args.limit, seed=args.seed)
        row = {"checkpoint": path, "dataset": cfg["dataset"], "arch": meta["arch"], "n": len(test),
               "eps": ecfg.eps, "alpha": ecfg.alpha}
        correct = {}
        for (p, layout), arm in zip(arms, labels):
            correct[arm], row[f"seconds_{arm}"] = robust(model, test, eps=ecfg.eps, alpha=ecfg.alpha, precision=p,
                                                         layout=layout, seed=args.seed)
            row[f"pgd20_{arm}"] = float(correct[arm].float().mean())
            print(f"{path} {arm}: PGD-20 {100 * row[f'pgd20_{arm}']:.2f}% ({row[f'seconds_{arm}']:.0f} s)", flush=True)
        for arm in labels[1:]:
            row[f"diff_points_{arm}"] = 100 * (row[f"pgd20_{arm}"] - row[f"pgd20_{labels[0]}"])
            row[f"agreement_{arm}"] = float((correct[arm] == correct[labels[0]]).float().mean())
        name = f"{cfg['dataset']} {meta['arch']}"
        results[name if name not in results else f"{name} ({path})"] = row  # two checkpoints of one kind
    doc = {"command": "PYTHONPATH=. python " + shlex.join(sys.argv),
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(), "models": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(f"{'model':<36}{'n':>6}{'eps':>7}" + "".join(f"{'pgd20 ' + a:>16}" for a in labels)
          + "".join(f"{'diff ' + a:>15}{'agree ' + a:>16}" for a in labels[1:]))
    for name, r in results.items():
        print(f"{name:<36}{r['n']:>6}{r['eps']:>7.3f}" + "".join(f"{100 * r[f'pgd20_{a}']:>15.2f}%" for a in labels)
              + "".join(f"{r[f'diff_points_{a}']:>+15.2f}{100 * r[f'agreement_{a}']:>15.1f}%" for a in labels[1:]))


if __name__ == "__main__":
    main()
