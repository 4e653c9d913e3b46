"""GACDLoss: the teacher-anchored, sample-reweighted contrastive distillation loss."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from . import functional as gf
from ._checks import (
    INDEX_DTYPES,
    check_index_range,
    check_int,
    check_option,
    check_real,
    check_same_device,
    check_tensor,
)
from .memory import FeatureQueue, MemoryBank
from .ops.reference import NORM_EPS
from .weighting import WEIGHTINGS, teacher_weights

BANKS = ("memory", "queue", "batch")
CRITICS = ("infonce", "nce")


class Embed(nn.Module):
    """Flatten, linear map to ``embed_dim``, L2-normalise (CRD's Embed). [B, ...] -> [B, embed_dim]."""

    def __init__(self, dim_in: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1, eps=NORM_EPS)


class GACDLoss(nn.Module):
    """Guided adversarial contrastive distillation loss.

    The query is the student's embedding of the (adversarial) input, the positive the teacher's
    embedding of the clean input (the anchor), the negatives teacher embeddings of other samples
    from a memory; each sample is weighted by how far the teacher can be trusted on it.

    Args:
        student_dim, teacher_dim: widths of the student and teacher features (after flattening).
        num_data: dataset size; required for ``bank="memory"`` and for ``critic="nce"``.
        embed_dim: width of the shared embedding (CRD: 128).
        num_negatives: negatives per sample: sampled bank rows ("memory") or the queue length
            ("queue") (CRD: 16384).
        temperature: tau (CRD: 0.07).
        momentum: memory update rows <- normalize(m * rows + (1 - m) * new) (CRD: 0.5).
        bank: "memory" (CRD per-sample rows, needs ``index``), "queue" (MoCo FIFO) or "batch"
            (in-batch negatives: the other samples' teacher embeddings of the batch, gradients
            flowing to them; under torch.distributed the whole global batch).
        weighting: "confidence" | "correct" | "none" (needs ``teacher_logits`` and ``targets``
            unless "none").
        critic: "infonce" (log-sum-exp) or "nce" (CRD's h = sigmoid(s/tau - log(K/num_data))).
        symmetric: also add the student-anchored term (teacher embedding as query against a
            memory of student embeddings), as CRD does.
        reduction: "mean" (weighted mean), "sum" or "none" ([B]).
        backend: backend for the contrastive op (None: the current selection).
        distributed: act across a torch.distributed process group (None: when one is
            initialised): the loss is reduced over the global batch and scaled so that DDP's
            gradient average equals one process's gradient on the concatenated batch, and the
            memories receive every rank's rows in rank order. Each rank's loss value is its share
            times the world size (the ranks' mean is the global loss).

    Forward: ``loss(f_s, f_t, index=None, contrast_index=None, *, teacher_logits=None,
    targets=None, weights=None, update_bank=None)``. ``loss(f_s, f_t, idx, contrast_idx)`` is
    RepDistiller's CRDLoss call. The memory is updated after the loss when ``update_bank`` (default:
    ``self.training``); keep it False while crafting attacks.
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_data: int | None = None,
        *,
        embed_dim: int = 128,
        num_negatives: int = 16384,
        temperature: float = 0.07,
        momentum: float = 0.5,
        bank: str = "memory",
        weighting: str = "confidence",
        critic: str = "infonce",
        symmetric: bool = False,
        reduction: str = "mean",
        backend: str | None = None,
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        check_int("student_dim", student_dim, minimum=1)
        check_int("teacher_dim", teacher_dim, minimum=1)
        check_int("embed_dim", embed_dim, minimum=1)
        self.num_negatives = check_int("num_negatives", num_negatives, minimum=1)
        self.temperature = check_real("temperature", temperature, positive=True)
        self.bank_kind = check_option("bank", bank, BANKS)
        self.weighting = check_option("weighting", weighting, WEIGHTINGS)
        self.critic = check_option("critic", critic, CRITICS)
        self.reduction = check_option("reduction", reduction, gf.REDUCTIONS)
        self.symmetric = bool(symmetric)
        self.backend = backend
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
        self.distributed = distributed
        if num_data is not None:
            check_int("num_data", num_data, minimum=2)
        if num_data is None and (bank == "memory" or critic == "nce"):
            raise ValueError(f"num_data (the dataset size) is required for bank={bank!r}, critic={critic!r}")
        self.num_data = num_data
        self.embed_s = Embed(student_dim, embed_dim)
        self.embed_t = Embed(teacher_dim, embed_dim)

        def make_memory() -> nn.Module | None:
            if bank == "memory":
                return MemoryBank(num_data, embed_dim, momentum)
            return FeatureQueue(num_negatives, embed_dim) if bank == "queue" else None

        self.memory_t = make_memory()  # teacher embeddings: negatives of the student query
        self.memory_s = make_memory() if self.symmetric else None  # student embeddings

    @classmethod
    def from_crd_opt(cls, opt: Any, **kwargs: Any) -> "GACDLoss":
        """Build from RepDistiller's options (s_dim, t_dim, feat_dim, nce_k, nce_t, nce_m, n_data)."""
        return cls(
            opt.s_dim, opt.t_dim, opt.n_data, embed_dim=opt.feat_dim, num_negatives=opt.nce_k,
            temperature=opt.nce_t, momentum=opt.nce_m, **kwargs,
        )

    def _term(self, query, positive, negatives, neg_index, weights, reduction):
        if self.critic == "nce":
            return gf.nce_loss(
                query, positive, negatives, num_data=self.num_data, temperature=self.temperature,
                weights=weights, neg_index=neg_index, reduction=reduction,
            )
        return gf.info_nce(
            query, positive, negatives, temperature=self.temperature, weights=weights,
            neg_index=neg_index, reduction=reduction, backend=self.backend,
        )

    @staticmethod
    def _batch_negatives(keys: torch.Tensor, dist_on: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """In-batch negatives: (keys of the global batch, [B, N-1] index of every key but the row's own)."""
        batch = keys.shape[0]
        offset, total = distributed.rank_offset(batch, keys.device) if dist_on else (0, batch)
        if total < 2:
            raise ValueError("bank='batch' needs at least 2 samples in the (global) batch")
        all_keys = distributed.all_gather_rows(keys, grad=True) if dist_on else keys
        own = torch.arange(offset, offset + batch, device=keys.device)[:, None]
        others = torch.arange(total - 1, device=keys.device)[None, :].expand(batch, -1)
        return all_keys, others + (others >= own).long()

    def forward(
        self,
        f_s: torch.Tensor,
        f_t: torch.Tensor,
        index: torch.Tensor | None = None,
        contrast_index: torch.Tensor | None = None,
        *,
        teacher_logits: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
        update_bank: bool | None = None,
    ) -> torch.Tensor:
        """Loss of student features ``f_s`` [B, ...] against teacher features ``f_t`` [B, ...].

        Args:
            index: [B] dataset indices (required for bank="memory").
            contrast_index: [B, 1 + K] CRD's sampled rows, positive in column 0 (ignored: the
                anchor is the teacher's embedding of the sample itself); columns 1.. are the
                negatives. Default: ``num_negatives`` rows drawn from all rows but the sample's.
            teacher_logits [B, C], targets [B]: for the sample weights.
            weights: [B] explicit per-sample weights (override ``weighting``).
            update_bank: update the memory with this batch (default: ``self.training``).

        Returns:
            float32 scalar (or [B] with reduction="none").
        """
        check_tensor("f_s", f_s, min_ndim=2)
        check_tensor("f_t", f_t, min_ndim=2)
        if f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"f_s and f_t must have the same batch size, got {f_s.shape[0]} and {f_t.shape[0]}")
        check_same_device(f_s=f_s, f_t=f_t, index=index, contrast_index=contrast_index)
        batch = f_s.shape[0]
        if weights is None:
            if self.weighting == "none":
                weights = None
            elif teacher_logits is None or targets is None:
                raise ValueError(
                    f"weighting={self.weighting!r} needs teacher_logits and targets; pass them, "
                    "pass weights=, or build GACDLoss(..., weighting='none')"
                )
            else:
                weights = teacher_weights(teacher_logits, targets, self.weighting)
                if weights.shape[0] != batch:
                    raise ValueError(f"teacher_logits must have {batch} rows like f_s, got {weights.shape[0]}")
        neg_index = None
        if self.bank_kind == "memory":
            if index is None:
                raise ValueError("bank='memory' needs index, the [B] dataset indices of the batch")
            check_tensor("index", index, ndim=1, dtypes=INDEX_DTYPES)
            if index.shape[0] != batch:
                raise ValueError(f"index must have shape ({batch},), got {tuple(index.shape)}")
            index = self.memory_t.check_index("index", index)
            if contrast_index is not None:
                check_tensor("contrast_index", contrast_index, ndim=2, dtypes=INDEX_DTYPES)
                if contrast_index.shape[0] != batch or contrast_index.shape[1] < 2:
                    raise ValueError(
                        f"contrast_index must have shape ({batch}, 1 + K) with K >= 1, got {tuple(contrast_index.shape)}"
                    )
                check_index_range("contrast_index", contrast_index, self.num_data, "rows of the memory bank")
                neg_index = contrast_index[:, 1:]
            else:
                neg_index = self.memory_t.sample_negatives(index, self.num_negatives)

        dist_on = distributed.active(self.distributed)
        reduction = "none" if dist_on else self.reduction
        s, t = self.embed_s(f_s), self.embed_t(f_t)
        if self.memory_t is not None:  # match the memory's dtype (autocast gives half embeddings)
            s, t = s.to(self.memory_t.rows.dtype), t.to(self.memory_t.rows.dtype)
        if self.bank_kind == "batch":
            keys_t, neg_index = self._batch_negatives(t, dist_on)
            keys_s = self._batch_negatives(s, dist_on)[0] if self.symmetric else None
        else:
            keys_t = self.memory_t.rows
            keys_s = self.memory_s.rows if self.symmetric else None
        loss = self._term(s, t, keys_t, neg_index, weights, reduction)
        if self.symmetric:
            loss = loss + self._term(t, s, keys_s, neg_index, weights, reduction)
        if dist_on:
            loss = distributed.global_reduce(loss, weights, self.reduction)

        if self.memory_t is not None and (self.training if update_bank is None else update_bank):
            if dist_on:  # every rank stores every rank's rows, in rank order
                t, s = distributed.all_gather_rows(t.detach()), distributed.all_gather_rows(s.detach())
                index = distributed.all_gather_rows(index) if index is not None else None
            self._update(self.memory_t, t, index)
            if self.symmetric:
                self._update(self.memory_s, s, index)
        return loss

    def _update(self, memory: nn.Module, values: torch.Tensor, index: torch.Tensor | None) -> None:
        if isinstance(memory, MemoryBank):
            memory.update(index, values)
        else:
            memory.enqueue(values)
