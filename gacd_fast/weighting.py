"""Sample reweighting from the teacher: how far the teacher can be trusted on each sample."""
from __future__ import annotations

import torch

from ._checks import INDEX_DTYPES, check_index_range, check_option, check_shape, check_tensor

WEIGHTINGS = ("confidence", "correct", "none")


def teacher_weights(teacher_logits: torch.Tensor, targets: torch.Tensor, mode: str) -> torch.Tensor:
    """Per-sample weights [B] float32, detached.

    Args:
        teacher_logits: [B, C] teacher logits on the clean inputs.
        targets: [B] int labels in [0, C).
        mode: "confidence" -> softmax(teacher_logits)[i, y_i]; "correct" -> 1 where the teacher's
            argmax equals y_i else 0; "none" -> ones.
    """
    check_option("weighting", mode, WEIGHTINGS)
    check_tensor("teacher_logits", teacher_logits, ndim=2)
    check_tensor("targets", targets, ndim=1, dtypes=INDEX_DTYPES)
    check_shape("targets", targets, (teacher_logits.shape[0],), "one label per teacher_logits row")
    check_index_range("targets", targets, teacher_logits.shape[1], "classes of teacher_logits")
    logits = teacher_logits.detach().float()
    y = targets.long()
    if mode == "confidence":
        return logits.softmax(1).gather(1, y[:, None]).squeeze(1)
    if mode == "correct":
        return (logits.argmax(1) == y).float()
    return torch.ones(y.shape[0], device=logits.device)
