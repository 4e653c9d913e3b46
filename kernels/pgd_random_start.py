"""The ``pgd_random_start`` op's kernel and launcher: the fused linf start clamp(x + U(-eps, eps), 0, 1).

The noise is Philox keyed by (seed, flat element index), rounded to the image dtype like the
reference's ``uniform_`` result. l2 starts and float64 images are the torch backend's (the policy is
in gacd_fast/ops/).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, elementwise_block, round_to


@triton.jit
def _pgd_random_start_linf_kernel(x_ptr, out_ptr, eps_ptr, eps_f, seed, numel, row_len,
                              EPS_T: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if EPS_T:
        e = tl.load(eps_ptr + offs // row_len, mask=mask, other=0.0).to(tl.float32)
    else:
        e = eps_f
    r = tl.rand(seed, offs)  # Philox, keyed by (seed, flat element index): reproducible
    noise = round_to((r * 2.0 - 1.0) * e, x.dtype)
    out = round_to(x.to(tl.float32) + noise, x.dtype)
    out = tl.minimum(tl.maximum(out, 0.0), 1.0)
    tl.store(out_ptr + offs, round_to(out, x.dtype).to(x.dtype), mask=mask)


def pgd_random_start_linf(x_nat, eps_t, eps, seed) -> torch.Tensor:
    """The ``pgd_random_start_linf`` kernel: clamp(x_nat + U(-eps, eps), 0, 1) as a new tensor like
    ``x_nat`` [B, ...] (fp16/bf16/fp32); ``eps_t`` [B] overrides ``eps``.

    The noise is Philox keyed by (seed, flat element index): the same seed gives the same result.
    """
    x = x_nat.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    row_len = numel // x.shape[0]
    e_t = eps_t.to(torch.float32).contiguous() if eps_t is not None else None
    block = elementwise_block(numel)
    _pgd_random_start_linf_kernel[(cdiv(numel, block),)](
        x, out, e_t if e_t is not None else x, float(eps), int(seed), numel, row_len,
        EPS_T=e_t is not None, BLOCK=block,
    )
    return out
