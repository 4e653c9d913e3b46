"""Every op of the library: :data:`OPS`, and the plain-PyTorch definitions gathered in one namespace.

Each op's module (``info_nce.py``, ``nce.py``, ``l2_normalize.py``, ``cosine_similarity.py``,
``pgd_step.py``, ``pgd_random_start.py``) declares it as its ``OP`` (``contract.Op``), with its
``reference``; the backends build their entries from :data:`OPS` (``entries.py``) and every backend
is checked against these references. Inputs are assumed validated (see ``gacd_fast.functional``).
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

# A new op is one more entry here.
OPS = (_info_nce.OP, _nce.OP, _l2_normalize.OP, _cosine_similarity.OP, _pgd_step.OP, _pgd_random_start.OP)

__all__ = [*(op.entry for op in OPS), "OPS", "l2_direction", "l2_normalize_rows", "acc_dtype", "NORM_EPS"]

globals().update({op.entry: op.reference for op in OPS})  # reference.info_nce_rows, reference.pgd_step_, ...
