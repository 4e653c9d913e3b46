"""Benchmark one whole GACD distillation step, side by side in one run, for every variant of
``workloads.VARIANTS``: the teacher's forward on the clean batch, a PGD-10 attack on the student,
the student's forward on the adversarial batch, CE + the GACD loss against a memory bank, backward,
the SGD step and the bank's momentum update.

- ``plain`` fp32: the README's drop-in block as a user writes it without gacd_fast: a hand-written
  torchattacks-order PGD loop, eager InfoNCE over the gathered bank rows ([B, K, D], as CRD's
  index_select), an in-place momentum update.
- ``torchattacks`` fp32: the same step with torchattacks.PGD as the attack.
- ``gacd`` fp32 / bf16: gacd_fast.PGD (``precision=``) and GACDLoss, the models' forwards under
  autocast in bf16.
- ``plain_cl`` fp32, ``gacd_cl`` fp32 / bf16: the same with models and batches in channels_last.

ResNet-18 student and teacher at B=128, K=16,384 (CRD's default), PGD-10 (issue 20's step; --quick
keeps it: it is the target), then the small CNNs of digits and MNIST-5k at their recipes' batch,
bank and attack. Time per step, images/s, peak memory (the first step in a fresh process on a
CPU), the ratios to plain fp32 and to torchattacks fp32, and issue 20's targets.

    python benchmarks/bench_train_step.py --quick
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gacd_fast  # noqa: E402
from bench_pgd import LogitsOnly, plain_pgd  # noqa: E402
from common import (  # noqa: E402
    Recorder, Skip, base_parser, peak_extra_mb,
)
from gacd_fast import _precision  # noqa: E402
from gacd_fast.functional import weighted_reduce  # noqa: E402
from workloads import (  # noqa: E402
    WORKLOADS, Variant, add_variants_option, emulated, images, model, summary, time_variants, warm_library,
)

TAU, MOMENTUM = 0.07, 0.5  # CRD's tau and momentum


@dataclass(frozen=True)
class StepShape:
    """A workload's step: batch, negatives per sample, PGD steps."""

    workload: str
    batch: int
    k: int
    steps: int


SHAPES = {
    # issue 20's step (also in --quick: it is what the targets are measured on)
    "quick": [StepShape("resnet18", 128, 16384, 10), StepShape("small_cnn_digits", 64, 1024, 10),
              StepShape("small_cnn_mnist5k", 32, 1024, 10)],
    "full": [StepShape("resnet18", 128, 16384, 10), StepShape("resnet18", 256, 16384, 10),
             StepShape("small_cnn_digits", 64, 1024, 10), StepShape("small_cnn_mnist5k", 32, 1024, 10)],
}
TARGETS = {"train_step_resnet18": [("speedup", "gacd bf16", "plain fp32", 2.2),
                                   ("memory_ratio", "gacd bf16", "plain fp32", 1.0)]}


def setup(shape: StepShape, variant: Variant, device: torch.device) -> Callable[[], object]:
    """One training step of ``variant`` on ``shape`` (models, bank and batch built here, seeded)."""
    wl = WORKLOADS[shape.workload]
    student = model(wl.student, wl, variant, device, seed=0)
    teacher = model(wl.teacher, wl, variant, device, seed=1).eval()
    x, y = images(wl, shape.batch, variant, device)
    index = torch.randperm(wl.num_data, generator=torch.Generator().manual_seed(2))[:shape.batch].to(device)
    torch.manual_seed(3)
    crit = gacd_fast.GACDLoss(student.feature_dim, teacher.feature_dim, wl.num_data, num_negatives=shape.k,
                              temperature=TAU, momentum=MOMENTUM).to(device)
    opt = torch.optim.SGD(list(student.parameters()) + list(crit.parameters()), lr=0.01, momentum=0.9)
    region = _precision.autocast(variant.precision, device)

    if variant.base == "gacd":
        attack = gacd_fast.PGD(student, eps=wl.eps, alpha=wl.alpha, steps=shape.steps, precision=variant.precision)

        def step():
            with torch.no_grad(), region:
                f_t, t_logits = teacher(x)  # once per batch, in the step's precision
            x_adv = attack(x, y)
            student.train()
            with region:
                f_s, logits = student(x_adv)
            loss = F.cross_entropy(logits.float(), y) + 0.8 * crit(f_s, f_t, index, teacher_logits=t_logits, targets=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    if variant.provider == "torchattacks":
        try:
            import torchattacks
        except Exception as exc:
            raise Skip(f"torchattacks not importable: {exc}") from None
        ta = torchattacks.PGD(LogitsOnly(student), eps=wl.eps, alpha=wl.alpha, steps=shape.steps)
        attack_fn = lambda: ta(x, y)  # noqa: E731
    else:
        attack_fn = lambda: plain_pgd(LogitsOnly(student), x, y, shape.steps, wl.eps, wl.alpha)  # noqa: E731
    memory = crit.bank_t.rows  # the same bank, updated in place as CRD does

    def plain_step():
        with torch.no_grad():
            f_t, t_logits = teacher(x)
        x_adv = attack_fn()
        student.train()
        f_s, logits = student(x_adv)
        s, t = crit.embed_s(f_s), crit.embed_t(f_t)
        r = torch.randint(wl.num_data - 1, (shape.batch, shape.k), device=device)
        neg = r + (r >= index[:, None]).long()
        w = t_logits.softmax(1).gather(1, y[:, None]).squeeze(1)
        gathered = F.normalize(memory[neg], dim=2)  # [B, K, D], as CRD's index_select does
        sn, tn = F.normalize(s, dim=1), F.normalize(t, dim=1)
        s_pos = (sn * tn).sum(1) / TAU
        logits_c = torch.cat([s_pos[:, None], torch.einsum("bd,bkd->bk", sn, gathered) / TAU], 1)
        rows = torch.logsumexp(logits_c, 1) - s_pos
        loss = F.cross_entropy(logits, y) + 0.8 * weighted_reduce(rows, w, "mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            mixed = memory[index] * MOMENTUM + t.detach() * (1 - MOMENTUM)
            memory.index_copy_(0, index, F.normalize(mixed, dim=1))
    return plain_step


def probe(spec: dict) -> None:
    """The peak extra memory of the first step in this (fresh) process."""
    device = torch.device(spec["device"])
    warm_library(device)
    fn = setup(StepShape(**spec["shape"]), Variant(spec["provider"], spec["precision"]), device)
    print(peak_extra_mb(fn, device, warmup=False))


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated workloads (default: all: {','.join(WORKLOADS)})")
    add_variants_option(ap)
    args = ap.parse_args()
    if args.probe:
        return probe(json.loads(args.probe))
    device = torch.device(args.device)
    rec = Recorder("bench_train_step", device)
    reps = args.reps or (10 if device.type == "cuda" else 3)
    chosen = args.workloads.split(",")
    for shape in SHAPES["quick" if args.quick else "full"]:
        if shape.workload not in chosen:
            continue
        op, dims = f"train_step_{shape.workload}", {"B": shape.batch, "K": shape.k}
        fns, variants = {}, {}
        for variant in args.variants:
            if emulated(variant, device) and args.quick and variant.channels_last:
                rec.skip(f"{variant.label} ({op})", "its precision is emulated here (minutes a step): --quick times "
                         "the plain-layout bf16 step only")
                continue
            try:
                fns[variant.label] = setup(shape, variant, device)
                variants[variant.label] = variant
            except Skip as why:
                rec.skip(variant.provider, str(why))
        time_variants(rec, op, dims, fns, variants, device, reps=reps, batch=shape.batch,
                      describe=lambda ms: f"PGD-{shape.steps} {ms / 1e3:.2f} s/step",
                      memory_spec=None if args.no_memory else lambda v: dict(
                          shape=vars(shape), provider=v.provider, precision=v.precision, device=str(device)),
                      script=Path(__file__))
        del fns  # the next workload's models and banks
    rec.write(args.out)
    print(summary(rec.rows, TARGETS))


if __name__ == "__main__":
    main()
