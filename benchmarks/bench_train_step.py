"""Benchmark one full GACD training step (PGD-10 attack + GACD loss + CE + backward + SGD step):
gacd_fast (PGD + GACDLoss on the fastest backend) against the same step written with plain
PyTorch ops (a torchattacks-order PGD loop, the materialised InfoNCE of the reference, a CRD-style
memory with an in-place momentum update).

    python benchmarks/bench_train_step.py --quick
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gacd_fast  # noqa: E402
from bench_pgd import LogitsOnly, plain_pgd  # noqa: E402
from common import Recorder, base_parser, peak_extra_mb, progress, time_ms  # noqa: E402
from gacd_fast.distill.models import build_model  # noqa: E402
from gacd_fast.functional import weighted_reduce  # noqa: E402

NUM_DATA, TAU, MOMENTUM = 50000, 0.07, 0.5  # CIFAR-10 size; CRD's tau and momentum


def setup(provider: str, batch: int, k: int, steps: int, teacher_name: str, device: torch.device) -> Callable[[], object]:
    torch.manual_seed(0)
    student = build_model("resnet18", 10, 3).to(device)
    teacher = build_model(teacher_name, 10, 3).to(device).eval()
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(10, (batch,), device=device)
    index = torch.randperm(NUM_DATA, device=device)[:batch]
    with torch.no_grad():
        f_t, t_logits = teacher(x)
    f_s_dim = student(x[:1])[0].shape[1]
    crit = gacd_fast.GACDLoss(f_s_dim, f_t.shape[1], NUM_DATA, num_negatives=k, temperature=TAU, momentum=MOMENTUM).to(device)
    opt = torch.optim.SGD(list(student.parameters()) + list(crit.parameters()), lr=0.01, momentum=0.9)

    if provider == "gacd":
        attack = gacd_fast.PGD(student, eps=8 / 255, alpha=2 / 255, steps=steps)

        def step():
            x_adv = attack(x, y)
            student.train()
            f_s, logits = student(x_adv)
            loss = F.cross_entropy(logits, y) + 0.8 * crit(f_s, f_t, index, teacher_logits=t_logits, targets=y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    memory = crit.bank_t.rows  # plain: the same bank, updated in place as CRD does

    def plain_step():
        x_adv = plain_pgd(LogitsOnly(student), x, y, steps)
        student.train()
        f_s, logits = student(x_adv)
        s, t = crit.embed_s(f_s), crit.embed_t(f_t)
        r = torch.randint(NUM_DATA - 1, (batch, k), device=device)
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


def main() -> None:
    ap = base_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    device = torch.device(args.device)
    rec = Recorder("bench_train_step", device)
    if args.quick:
        configs = [dict(batch=32, k=4096, steps=2, teacher="resnet18")]
    else:
        configs = [dict(batch=128, k=16384, steps=10, teacher="wrn_34_10")]
    for c in configs:
        shape = {"B": c["batch"], "K": c["k"]}
        for provider in ("gacd", "torch_eager"):
            fn = setup(provider, c["batch"], c["k"], c["steps"], c["teacher"], device)
            p50, p20, p80 = time_ms(fn, device, warmup=1, reps=args.reps or 3)
            rec.add("gacd_train_step", provider, "full", "float32", shape, "time", "ms", p50, p20, p80)
            line = f"  train step {c} {provider}: {p50:.1f} ms"
            if device.type == "cuda" and not args.no_memory:
                mb = peak_extra_mb(fn, device)
                rec.add("gacd_train_step", provider, "full", "float32", shape, "peak_memory", "MB", mb)
                line += f", peak extra {mb:.0f} MB"
            progress(line)
    rec.write(args.out)
    print(rec.summary())


if __name__ == "__main__":
    main()
