"""Backend "torch": the reference ops, with the memory-lean chunked InfoNCE. Runs anywhere."""
from __future__ import annotations

import torch

from .chunked import info_nce_rows
from .reference import cosine_similarity, nce_rows, normalize, pgd_random_start, pgd_step_

__all__ = ["info_nce_rows", "nce_rows", "normalize", "cosine_similarity", "pgd_step_", "pgd_random_start", "unavailable_reason"]


def unavailable_reason(device: torch.device | None, *, auto: bool = False) -> str | None:
    return None
