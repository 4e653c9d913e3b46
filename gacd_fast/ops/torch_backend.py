"""Backend "torch": the reference ops, with the memory-lean chunked InfoNCE. Runs anywhere."""
from __future__ import annotations

import torch

from . import cosine_similarity as _cosine_similarity
from . import l2_normalize as _l2_normalize
from . import nce as _nce
from . import pgd_random_start as _pgd_random_start
from . import pgd_step as _pgd_step
from .chunked import info_nce_rows

__all__ = [
    "info_nce_rows", "nce_rows", "l2_normalize", "cosine_similarity", "pgd_step_", "pgd_random_start",
    "unavailable_reason",
]

nce_rows = _nce.reference
l2_normalize = _l2_normalize.reference
cosine_similarity = _cosine_similarity.reference
pgd_step_ = _pgd_step.reference
pgd_random_start = _pgd_random_start.reference


def unavailable_reason(device: torch.device | None, *, auto: bool = False) -> str | None:
    return None
