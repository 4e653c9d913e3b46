"""gacd_fast: fast, exact guided adversarial contrastive distillation (GACD) for PyTorch.

    from gacd_fast import GACDLoss, PGD
"""
from ._source_tree import map_kernels_package

map_kernels_package()

from ._checks import set_value_checks
from .attacks import FGSM, PGD, Attack
from .backends import available_backends, get_backend, set_backend
from .feature_tap import FeatureTap
from .functional import cosine_similarity, info_nce, l2_normalize, nce_loss, pgd_random_start, pgd_step_
from .loss import Embed, GACDLoss
from .memory import FeatureQueue, MemoryBank
from .weighting import teacher_weights

__version__ = "0.1.0"

__all__ = [
    "GACDLoss", "Embed", "MemoryBank", "FeatureQueue", "teacher_weights",
    "PGD", "FGSM", "Attack", "FeatureTap",
    "info_nce", "nce_loss", "cosine_similarity", "l2_normalize", "pgd_step_", "pgd_random_start",
    "set_backend", "get_backend", "available_backends", "set_value_checks",
]
