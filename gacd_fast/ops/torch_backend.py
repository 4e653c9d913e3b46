"""Backend "torch": the reference ops, with the memory-lean chunked InfoNCE. Runs anywhere.

Its entries are the ops' ``torch`` implementations (``Op.torch``, else the reference), one per op
of ``reference.OPS``, built in ``entries.py``.
"""
from __future__ import annotations

import torch

from .entries import torch_entries

_ENTRIES = torch_entries()
globals().update(_ENTRIES)  # info_nce_rows, nce_rows, l2_normalize, ...
__all__ = [*_ENTRIES, "unavailable_reason"]


def unavailable_reason(device: torch.device | None, *, auto: bool = False) -> str | None:
    return None
