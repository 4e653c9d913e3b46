"""GACDLoss: the teacher-anchored, sample-reweighted contrastive distillation loss."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import backends, distributed
from . import functional as gf
from ._checks import (
    INDEX_DTYPES,
    check_int,
    check_option,
    check_same_device,
    check_temperature,
    check_tensor,
)
from .memory import BatchNegatives, FeatureQueue, MemoryBank, NegativeBank
from .ops.reference import NORM_EPS
from .weighting import WEIGHTINGS, teacher_weights

BANKS = ("memory", "queue", "batch")
CRITICS = ("infonce", "nce")
TEACHER_HEADS = ("frozen", "train")


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
    from a bank; each sample is weighted by how far the teacher can be trusted on it.

    Args:
        student_dim, teacher_dim: widths of the student and teacher features (after flattening).
        num_data: dataset size; required for ``bank="memory"`` and for ``critic="nce"``.
        embed_dim: width of the shared embedding (CRD: 128).
        num_negatives: negatives per sample: sampled bank rows ("memory") or the queue length
            ("queue") (CRD: 16384).
        temperature: tau (CRD: 0.07).
        momentum: memory update rows <- normalize(m * rows + (1 - m) * new) (CRD: 0.5).
        bank: "memory" (CRD per-sample rows, needs ``index``), "queue" (MoCo FIFO) or "batch"
            (in-batch negatives: the other samples' teacher embeddings of the batch; under
            torch.distributed the whole global batch). See :mod:`gacd_fast.memory`.
        teacher_head: "frozen" (default): the teacher's embedding head is a fixed random linear
            map, so the teacher embeddings are a fixed function of the frozen teacher and every
            stored row stays exact; "train": trained with the loss, as CRD's ``embed_t`` (its
            stored rows then go stale as it moves, and the loss can be lowered by telling fresh
            rows from stale ones instead of samples apart: measured in docs/bank_study.md).
        weighting: "confidence" | "correct" | "none" (needs ``teacher_logits`` and ``targets``
            unless "none").
        critic: "infonce" (log-sum-exp) or "nce" (CRD's h = sigmoid(s/tau - log(K/num_data))).
        symmetric: also add the student-anchored term (teacher embedding as query against a
            bank of student embeddings), as CRD does.
        reduction: "mean" (weighted mean), "sum" or "none" ([B]).
        backend: backend for the contrastive op (None: the current selection).
        distributed: act across a torch.distributed process group (None: when one is
            initialised): the loss is reduced over the global batch and scaled so that DDP's
            gradient average equals one process's gradient on the concatenated batch, and the
            banks receive every rank's rows in rank order. Each rank's loss value is its share
            times the world size (the ranks' mean is the global loss).

    Forward: ``loss(f_s, f_t, index=None, contrast_index=None, *, teacher_logits=None,
    targets=None, weights=None, update_bank=None)``. ``loss(f_s, f_t, idx, contrast_idx)`` is
    RepDistiller's CRDLoss call. The bank is updated after the loss when ``update_bank`` (default:
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
        teacher_head: str = "frozen",
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
        self.temperature = check_temperature(temperature)
        self.bank_kind = check_option("bank", bank, BANKS)
        self.teacher_head = check_option("teacher_head", teacher_head, TEACHER_HEADS)
        self.weighting = check_option("weighting", weighting, WEIGHTINGS)
        self.critic = check_option("critic", critic, CRITICS)
        self.reduction = check_option("reduction", reduction, gf.REDUCTIONS)
        self.symmetric = check_bool("symmetric", symmetric)
        self.backend = _check_backend_name(backend)
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
        if teacher_head == "frozen":
            self.embed_t.requires_grad_(False)
        self.bank_t = self._make_bank(embed_dim, momentum)  # teacher embeddings: negatives of the student query
        self.bank_s = self._make_bank(embed_dim, momentum) if self.symmetric else None  # student embeddings

    def _make_bank(self, dim: int, momentum: float) -> NegativeBank:
        if self.bank_kind == "memory":
            return MemoryBank(self.num_data, dim, momentum, self.num_negatives)
        return FeatureQueue(self.num_negatives, dim) if self.bank_kind == "queue" else BatchNegatives()

    @classmethod
    def from_crd_opt(cls, opt: Any, **kwargs: Any) -> "GACDLoss":
        """Build from RepDistiller's options (s_dim, t_dim, feat_dim, nce_k, nce_t, nce_m, n_data)."""
        return cls(
            opt.s_dim, opt.t_dim, opt.n_data, embed_dim=opt.feat_dim, num_negatives=opt.nce_k,
            temperature=opt.nce_t, momentum=opt.nce_m, **kwargs,
        )

    def sample_contrast_index(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """CRD's ``contrast_idx`` [B, 1 + num_negatives] for dataset rows ``index`` [B]: column 0 the
        sample, then sampled other rows. Pass it to several calls (an attack's and the training
        loss's) to share their negatives. None for the queue and batch banks (nothing to sample)."""
        return self.bank_t.sample_contrast_index(index, generator)

    @torch.no_grad()
    def prefill(self, f_t: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write the teacher's embeddings of ``f_t`` [B, teacher_dim] (dataset rows ``index``) into the
        bank exactly, e.g. the whole training set once before the first step, so the negatives are
        real from the start. Meant for ``teacher_head="frozen"`` (the rows then stay exact)."""
        check_tensor("f_t", f_t, min_ndim=2)
        t = self.embed_t(f_t.to(self.embed_t.linear.weight.dtype))
        self.bank_t.prefill(t, index)

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
                negatives (bank="memory" only). Default: ``num_negatives`` rows drawn from all
                rows but the sample's (see :meth:`sample_contrast_index`).
            teacher_logits [B, C], targets [B]: for the sample weights.
            weights: [B] explicit per-sample weights (override ``weighting``).
            update_bank: update the bank with this batch (default: ``self.training``).

        Returns:
            float32 scalar (or [B] with reduction="none").
        """
        batch = self._check_inputs(f_s, f_t, index, contrast_index, update_bank)
        weights = self._weights(weights, teacher_logits, targets, batch)
        if self.bank_t.needs_index:
            if index is None:
                raise ValueError(f"bank={self.bank_kind!r} needs index, the [B] dataset indices of the batch")
            index = self.bank_t.check_index("index", index, batch)
        dist_on = distributed.active(self.distributed)
        s, t = self.embed_s(f_s), self.embed_t(f_t)
        dtype = self.bank_t.rows_dtype
        if dtype is not None:  # match the stored rows' dtype (autocast gives half embeddings)
            s, t = s.to(dtype), t.to(dtype)
        loss = self._loss(s, t, index, contrast_index, weights, dist_on)
        if self.training if update_bank is None else update_bank:
            self.bank_t.update(t.detach(), index, dist_on=dist_on)
            if self.bank_s is not None:
                self.bank_s.update(s.detach(), index, dist_on=dist_on)
        return loss

    def _check_inputs(self, f_s, f_t, index, contrast_index, update_bank) -> int:
        check_tensor("f_s", f_s, min_ndim=2)
        check_tensor("f_t", f_t, min_ndim=2)
        if f_s.shape[0] != f_t.shape[0]:
            raise ValueError(f"f_s and f_t must have the same batch size, got {f_s.shape[0]} and {f_t.shape[0]}")
        for name, value in (("index", index), ("contrast_index", contrast_index)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of dataset indices or None, got {type(value).__name__}")
        if update_bank is not None:
            check_bool("update_bank", update_bank)
        check_same_device(f_s=f_s, f_t=f_t, index=index, contrast_index=contrast_index)
        batch = f_s.shape[0]
        if contrast_index is not None:
            check_tensor("contrast_index", contrast_index, ndim=2, dtypes=INDEX_DTYPES)
            if contrast_index.shape[0] != batch or contrast_index.shape[1] < 2:
                raise ValueError(
                    f"contrast_index must have shape ({batch}, 1 + K) with K >= 1, got {tuple(contrast_index.shape)}"
                )
        return batch

    def _weights(self, weights, teacher_logits, targets, batch: int) -> torch.Tensor | None:
        """Explicit ``weights``, else the teacher's (None for weighting="none")."""
        if weights is not None or self.weighting == "none":
            return weights
        if teacher_logits is None or targets is None:
            raise ValueError(
                f"weighting={self.weighting!r} needs teacher_logits and targets; pass them, "
                "pass weights=, or build GACDLoss(..., weighting='none')"
            )
        weights = teacher_weights(teacher_logits, targets, self.weighting)
        if weights.shape[0] != batch:
            raise ValueError(f"teacher_logits must have {batch} rows like f_s, got {weights.shape[0]}")
        return weights

    def _loss(self, s, t, index, contrast_index, weights, dist_on: bool) -> torch.Tensor:
        """The (weighted, reduced) contrastive term(s) against the banks' negatives."""
        reduction = "none" if dist_on else self.reduction
        rows_t, neg_index = self.bank_t.negatives(t, index, contrast_index=contrast_index, dist_on=dist_on)
        loss = self._term(s, t, rows_t, neg_index, weights, reduction)
        if self.bank_s is not None:  # the student-anchored term shares the sampled rows
            shared = torch.cat([index[:, None], neg_index], 1) if self.bank_s.needs_index else None
            rows_s, _ = self.bank_s.negatives(s, index, contrast_index=shared, dist_on=dist_on)
            loss = loss + self._term(t, s, rows_s, neg_index, weights, reduction)
        return distributed.global_reduce(loss, weights, self.reduction) if dist_on else loss

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


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def _check_backend_name(backend: object) -> str | None:
    """None, "auto" or a registered backend name (checked now, not at the first forward)."""
    if backend is None or backend == "auto":
        return backend  # type: ignore[return-value]
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    backends.unavailable_reason(backend)  # ValueError naming the known backends when unknown
    return backend
