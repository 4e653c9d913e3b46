"""What bank_dtype="bf16" costs at the op level, at CRD's CIFAR scale (50,000 rows, 16,384 sampled
negatives, B=128, D=128): the same GACDLoss (same heads, same rows before rounding, same sampled
negatives) with an fp32 and a bf16 bank; the loss and d loss / d f_s relative to fp32's, and the
bank's bytes. Writes bank_dtype_error.json next to this file.

    PYTHONPATH=. python docs/results/mixed_precision/bank_dtype_error.py
"""
from __future__ import annotations

import json
import os

import torch

from gacd_fast import GACDLoss

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    torch.manual_seed(0)
    num_data, k, batch, s_dim, t_dim = 50000, 16384, 128, 512, 640
    crits = {d: GACDLoss(s_dim, t_dim, num_data, num_negatives=k, weighting="none", bank_dtype=d) for d in ("fp32", "bf16")}
    crits["bf16"].load_state_dict(crits["fp32"].state_dict())  # same heads; the rows rounded to bf16
    f_t_all = torch.randn(num_data, t_dim)
    for c in crits.values():  # a prefilled bank, as the pipeline starts (exact rows, then rounded for bf16)
        for i in range(0, num_data, 5000):
            c.prefill(f_t_all[i:i + 5000], torch.arange(i, min(num_data, i + 5000)))
    index = torch.randperm(num_data)[:batch]
    contrast = crits["fp32"].sample_contrast_index(index)
    f_s, f_t = torch.randn(batch, s_dim), f_t_all[index] + 0.5 * torch.randn(batch, t_dim)
    out = {}
    for d, c in crits.items():
        fs = f_s.clone().requires_grad_(True)
        loss = c(fs, f_t, index, contrast, update_bank=False)
        (grad,) = torch.autograd.grad(loss, fs)
        out[d] = (loss.detach().double(), grad.double(), c.bank_t.rows.numel() * c.bank_t.rows.element_size())
    ref_loss, ref_grad, ref_bytes = out["fp32"]
    loss, grad, nbytes = out["bf16"]
    doc = {
        "shape": dict(num_data=num_data, num_negatives=k, batch=batch, embed_dim=128),
        "loss_fp32": float(ref_loss), "loss_bf16": float(loss),
        "loss_rel_error": float((loss - ref_loss).abs() / ref_loss.abs()),
        "grad_rel_error": float((grad - ref_grad).norm() / ref_grad.norm()),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0)),
        "bank_bytes_fp32": ref_bytes, "bank_bytes_bf16": nbytes,
        "command": "PYTHONPATH=. python docs/results/mixed_precision/bank_dtype_error.py",
    }
    with open(os.path.join(HERE, "bank_dtype_error.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
