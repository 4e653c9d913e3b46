"""The bank-variant exploration of docs/bank_study.md: feature-only GACD students on digits (GACD loss
alone, guided attack, no labels), each judged by a linear probe on its frozen features (clean and
PGD-20 accuracy at eps 0.15), plus the teacher / natural / AT / untrained probes.

    python docs/results/bank_variants/explore.py VARIANTS SEEDS [EPOCHS] >> variants_digits.jsonl

VARIANTS: comma-separated; teacher | natural | at | untrained | <bank>[+head=frozen|train][+prefill=1|0]
[+m=<momentum>][+K=<negatives>][+tau=<temperature>][+atk=guided|ce]. One JSON line per (variant, seed):
probe clean and PGD-20 accuracy and the per-epoch GACD loss ("curve"). Digits defaults as the demo
(eps 0.2, PGD-5 step 0.05, 12 epochs, SGD lr 0.05, K 1024, tau 0.07); teachers cached in /tmp/exp.
"""
import json, sys, time, copy
import torch
from gacd_fast import GACDLoss
from gacd_fast.distill.data import load_dataset
from gacd_fast.distill.methods import AttackSpec, GACD, Natural, PGDAT
from gacd_fast.distill.models import build_model
from gacd_fast.distill.train import fit, Logger
from gacd_fast.distill.evaluate import linear_probe

torch.set_num_threads(1)
variants = sys.argv[1].split(",")
seeds = [int(s) for s in sys.argv[2].split(",")]
epochs = int(sys.argv[3]) if len(sys.argv) > 3 else 12
log = Logger(None, quiet=True)
data = load_dataset("digits")
atk = AttackSpec(0.2, 0.05, 5)
def train(model, method, seed, ep=epochs):
    torch.manual_seed(seed)
    fit(model, method, data.train, epochs=ep, batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4,
        lr_milestones=[0.5, 0.75], augment=False, device="cpu", seed=seed, test=None, log=log, tag="x", progress=False)
    return model
def probe(model, seed):
    r = linear_probe(model, data.train, data.test, epochs=60, eps=0.15, alpha=0.15/4, pgd_steps=20, seed=seed)
    return r["transfer_clean"], r["transfer_pgd20"]
import os
for seed in seeds:
    os.makedirs("/tmp/exp", exist_ok=True)
    tpath = f"/tmp/exp/teacher{seed}.pt"
    if os.path.exists(tpath):
        teacher = build_model("small_cnn_teacher", 10, 1); teacher.load_state_dict(torch.load(tpath))
    else:
        torch.manual_seed(seed); teacher = build_model("small_cnn_teacher", 10, 1)
        train(teacher, PGDAT(atk), seed, 15); torch.save(teacher.state_dict(), tpath)
    teacher.eval()
    for v in variants:
        t0 = time.time()
        opts = dict(x.split("=") for x in v.split("+")[1:]) if "+" in v else {}
        kind = v.split("+")[0]
        torch.manual_seed(seed)
        student = build_model("small_cnn_student", 10, 1)
        if kind == "teacher":
            res = probe(teacher, seed)
        elif kind == "natural":
            res = probe(train(student, Natural(), seed), seed)
        elif kind == "at":
            res = probe(train(student, PGDAT(atk), seed), seed)
        elif kind == "untrained":
            res = probe(student, seed)
        else:  # gacd feature-only: bank kind
            crit = GACDLoss(student.feature_dim, teacher.feature_dim, len(data.train), num_negatives=int(opts.get("K", 1024)),
                            bank=kind, weighting="none", temperature=float(opts.get("tau", 0.07)), momentum=float(opts.get("m", 0.5)),
                            teacher_head=opts.get("head", "frozen"))  # the library default
            method = GACD(copy.deepcopy(teacher), crit, AttackSpec(0.2, 0.05, int(opts.get("steps", 5))), ce_weight=0.0,
                          attack_objective=opts.get("atk", "guided"), prefill=opts.get("prefill", "1") == "1")
            hist = []
            orig_step = method.step
            def step(*a, **k):
                o = orig_step(*a, **k); hist.append(o.parts["gacd"]); return o
            method.step = step
            train(student, method, seed)
            n = len(hist) // epochs
            curve = [round(sum(hist[i*n:(i+1)*n]) / n, 2) for i in range(epochs)]
            res = probe(student, seed) + (curve,)
        print(json.dumps({"v": v, "seed": seed, "clean": round(res[0], 4), "pgd": round(res[1], 4),
                          "curve": res[2] if len(res) > 2 else None, "s": round(time.time() - t0, 1)}), flush=True)
