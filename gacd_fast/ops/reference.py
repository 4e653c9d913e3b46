"""The reference: the plain-PyTorch definition of every op, gathered in one namespace.

Each op's module (``info_nce.py``, ``nce.py``, ``l2_normalize.py``, ``cosine_similarity.py``,
``pgd_step.py``, ``pgd_random_start.py``) defines it as its ``reference``; every backend is checked
against these. Inputs are assumed validated (see ``gacd_fast.functional``).
"""
from __future__ import annotations

from .._numerics import NORM_EPS, acc_dtype
from . import cosine_similarity as _cosine_similarity
from . import info_nce as _info_nce
from . import l2_normalize as _l2_normalize
from . import nce as _nce
from . import pgd_random_start as _pgd_random_start
from . import pgd_step as _pgd_step
from .norms import l2_normalize as l2_normalize_rows
from .pgd_step import l2_direction

__all__ = [
    "info_nce_rows", "nce_rows", "l2_normalize", "cosine_similarity", "pgd_step_", "pgd_random_start",
    "l2_direction", "l2_normalize_rows", "acc_dtype", "NORM_EPS",
]

info_nce_rows = _info_nce.reference
nce_rows = _nce.reference
l2_normalize = _l2_normalize.reference
cosine_similarity = _cosine_similarity.reference
pgd_step_ = _pgd_step.reference
pgd_random_start = _pgd_random_start.reference
