"""GACDLoss: the teacher-anchored, sample-reweighted contrastive distillation loss, and RepDistiller's
CRDLoss as one configuration of it (:meth:`GACDLoss.from_crd_opt`)."""
from __future__ import annotations

import warnings
from typing import Any, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _precision, collectives
from . import functional as gf
from ._checks import (
    INDEX_DTYPES,
    check_backend_name,
    check_bool,
    check_int,
    check_option,
    check_real,
    check_same_device,
    check_temperature,
    check_tensor,
)
from ._numerics import NORM_EPS
from .attacks import model_mode
from .memory import BANK_DTYPES, BANKS
from .weighting import WEIGHTINGS, teacher_weights

CRITICS = ("infonce", "nce", "crd_nce")
TEACHER_HEADS = ("frozen", "train")
CRD_EPS = 1e-7  # RepDistiller's ContrastLoss adds it to every denominator
CRD_OPTIONS = ("s_dim", "t_dim", "feat_dim", "nce_k", "nce_t", "nce_m", "n_data")  # read by from_crd_opt


class Embed(nn.Module):
    """Flatten, linear map to ``embed_dim``, L2-normalise (CRD's Embed). [B, ...] -> [B, embed_dim].

    Features of any float dtype (e.g. bf16 ones from an autocast region) are cast to the head's
    dtype, and the head runs in it whatever autocast region encloses it: it is a small product beside
    the model's, and its rounding would reach every logit multiplied by 1/temperature."""

    def __init__(self, dim_in: int, embed_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _precision.no_autocast(x.device):
            x = x.flatten(1).to(self.linear.weight.dtype)
            return F.normalize(self.linear(x), dim=1, eps=NORM_EPS)


class Term(NamedTuple):
    """One contrastive term: each ``query`` row [B, D] against its ``positive`` row [B, D] and the
    rows ``neg_index`` [B, M] of ``negatives`` [N, D] (every row of it when ``neg_index`` is None)."""

    query: torch.Tensor
    positive: torch.Tensor
    negatives: torch.Tensor
    neg_index: torch.Tensor | None


class GACDLoss(nn.Module):
    """Guided adversarial contrastive distillation loss.

    The query is the student's embedding of the (adversarial) input, the positive the teacher's
    embedding of the clean input (the anchor), the negatives teacher embeddings of other samples
    from a bank; each sample is weighted by how far the teacher can be trusted on it.
    :meth:`from_crd_opt` builds RepDistiller's CRDLoss instead (``critic="crd_nce"``).

    Args:
        student_dim, teacher_dim: widths of the student and teacher features (after flattening).
        num_data: dataset size; required for ``bank="memory"`` and for the NCE critics.
        embed_dim: width of the shared embedding (CRD: 128).
        num_negatives: negatives per sample: sampled bank rows ("memory") or the queue length
            ("queue") (CRD: 16384).
        temperature: tau (CRD: 0.07).
        momentum: memory update rows <- normalize(m * rows + (1 - m) * new) (CRD: 0.5).
        bank: the bank kind: "memory" (CRD per-sample rows, needs ``index``), "queue" (MoCo FIFO)
            or "batch" (in-batch negatives: the other samples' teacher embeddings of the batch;
            under torch.distributed the whole global batch). See :mod:`gacd_fast.memory`.
        teacher_head: "frozen" (default): the teacher's embedding head is a fixed random linear
            map, so the teacher embeddings are a fixed function of the frozen teacher and every
            stored row stays exact; "train": trained with the loss, as CRD's ``embed_t`` (its
            stored rows then go stale as it moves, and the loss can be lowered by telling fresh
            rows from stale ones instead of samples apart: measured in docs/bank_study.md).
        weighting: "confidence" | "correct" | "none" (needs ``teacher_logits`` and ``targets``
            unless "none").
        critic: "infonce" (log-sum-exp against the fresh anchor); "nce" (CRD's critic
            h = sigmoid(s/tau - log(K/num_data)) against the fresh anchor); "crd_nce" (CRD exactly,
            needs bank="memory": each embedding is scored against the *stored* rows of the other
            side at ``contrast_index``, column 0 the positive, rows not re-normalised, with CRD's
            normaliser Z and eps 1e-7; Z is set once, from the first forward call, to
            mean(exp(s/tau)) * num_data over that call's [B, 1 + K] scores, kept in the
            ``crd_z`` buffer ([student-query term, teacher-query term], -1 until set) so a
            resumed run keeps it; it is read on the host each call, as CRD's ``.item()``).
        symmetric: also add the teacher-query term (teacher embedding as query against a bank of
            student embeddings), as CRD does.
        bank_dtype: "fp32" (default) or "bf16": the dtype of the stored rows (bank="memory" and
            "queue"). "bf16" halves the bank (CRD on ImageNet: 1.28M x 128 rows x 2 banks, 1.3 GB
            in fp32); the embeddings are then rounded to bf16 too and the InfoNCE products run in
            bf16 with float32 sums, so the loss is float32 but its inputs carry bf16 rounding
            (measured in docs/mixed_precision.md). Momentum updates mix in float32 and round once.
        reduction: "mean" (weighted mean), "sum" or "none" ([B]: each row's terms summed).
        backend: backend for the InfoNCE op (None: the current selection).
        distributed: act across a torch.distributed process group (None: when one is
            initialised): the loss is reduced over the global batch and scaled so that DDP's
            gradient average equals one process's gradient on the concatenated batch, and the
            banks receive every rank's rows in rank order. Each rank's loss value is its share
            times the world size (the ranks' mean is the global loss). With "crd_nce", Z is set
            from the global first batch (all ranks hold the same Z).

    Forward: ``loss(f_s, f_t, index=None, contrast_index=None, *, teacher_logits=None,
    targets=None, weights=None, update_bank=None)``. ``loss(f_s, f_t, idx, contrast_idx)`` is
    RepDistiller's CRDLoss call. The bank is updated after the loss when ``update_bank`` (default:
    ``self.training``); keep it False while crafting attacks. Fill a memory or queue bank before
    training with :meth:`prefill_from` (or :meth:`prefill`); the first training call on an unfilled
    one warns once (with the frozen teacher head).
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
        bank_dtype: str = "fp32",
    ) -> None:
        super().__init__()
        check_int("student_dim", student_dim, minimum=1)
        check_int("teacher_dim", teacher_dim, minimum=1)
        check_int("embed_dim", embed_dim, minimum=1)
        self.num_negatives = check_int("num_negatives", num_negatives, minimum=1)
        self.temperature = check_temperature(temperature)
        check_option("bank", bank, tuple(BANKS))
        self.teacher_head = check_option("teacher_head", teacher_head, TEACHER_HEADS)
        self.weighting = check_option("weighting", weighting, WEIGHTINGS)
        self.critic = check_option("critic", critic, CRITICS)
        self.reduction = check_option("reduction", reduction, gf.REDUCTIONS)
        self.symmetric = check_bool("symmetric", symmetric)
        self.backend = check_backend_name(backend)
        if distributed is not None and not isinstance(distributed, bool):
            raise TypeError(f"distributed must be a bool or None, got {type(distributed).__name__}")
        self.across_ranks = distributed  # None: decided per call (whether a process group is initialised)
        if num_data is not None:
            check_int("num_data", num_data, minimum=2)
        if num_data is None and (bank == "memory" or critic != "infonce"):
            raise ValueError(f"num_data (the dataset size) is required for bank={bank!r}, critic={critic!r}")
        if critic == "crd_nce" and bank != "memory":
            raise ValueError(f"critic='crd_nce' needs bank='memory' (its positives are the samples' stored rows), "
                             f"got bank={bank!r}")
        self.num_data = num_data
        self.embed_s = Embed(student_dim, embed_dim)
        self.embed_t = Embed(teacher_dim, embed_dim)
        if teacher_head == "frozen":
            self.embed_t.requires_grad_(False)
        rows_dtype = BANK_DTYPES[check_option("bank_dtype", bank_dtype, tuple(BANK_DTYPES))]
        if bank == "batch" and bank_dtype != "fp32":
            raise ValueError(f"bank_dtype={bank_dtype!r} needs a bank that stores rows ('memory' or 'queue'); "
                             "bank='batch' stores none")
        options = dict(num_data=num_data, dim=embed_dim, momentum=momentum, num_negatives=self.num_negatives,
                       dtype=rows_dtype)
        # CRD's order (memory_v1, the student's rows, first), so that a seeded run draws CRD's memories
        bank_s = BANKS[bank].from_options(**options) if symmetric else None  # student embeddings
        self.bank_t = BANKS[bank].from_options(**options)  # teacher embeddings
        self.bank_s = bank_s
        self._checked_fill = False  # whether the first training call looked at the bank's fill
        if critic == "crd_nce":  # CRD's Z per term: [student query vs bank_t, teacher query vs bank_s]
            self.register_buffer("crd_z", torch.full((2,), -1.0))

    @classmethod
    def from_crd_opt(cls, opt: Any, **overrides: Any) -> "GACDLoss":
        """RepDistiller's ``CRDLoss(opt)``: same call, same value for the same embedding weights
        and memory state.

        Reads ``opt.s_dim, t_dim, feat_dim, nce_k, nce_t, nce_m, n_data`` and sets CRD's
        configuration: ``critic="crd_nce", symmetric=True, bank="memory", teacher_head="train",
        weighting="none"``. ``overrides`` replace any of these or set other options; GACD's
        reweighting is ``weighting="confidence"`` (then pass ``teacher_logits`` and ``targets``).
        ``nce_t`` and ``nce_m`` are rounded to float32, as CRD's ContrastMemory keeps them (its
        ``params`` buffer): the module uses CRD's values of tau and momentum. The heads
        and the memories are created in CRDLoss's order (``embed_s``, ``embed_t``, the student's
        memory_v1 = ``bank_s``, the teacher's memory_v2 = ``bank_t``), so under the same seed the
        module starts from CRDLoss's weights and memories.
        One difference remains: with ``contrast_idx=None`` the negatives drawn never include the
        sample's own row (CRDLoss's draw may); RepDistiller's loaders pass ``contrast_idx``.
        """
        missing = [name for name in CRD_OPTIONS if not hasattr(opt, name)]
        if missing:
            raise TypeError(f"opt must carry RepDistiller's CRD options {list(CRD_OPTIONS)}; "
                            f"{type(opt).__name__} lacks {missing}")
        tau, momentum = (_as_float32(name, getattr(opt, name)) for name in ("nce_t", "nce_m"))
        crd = dict(embed_dim=opt.feat_dim, num_negatives=opt.nce_k, temperature=tau, momentum=momentum,
                   critic="crd_nce", symmetric=True, bank="memory", teacher_head="train", weighting="none")
        return cls(opt.s_dim, opt.t_dim, opt.n_data, **{**crd, **overrides})

    def sample_contrast_index(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """CRD's ``contrast_idx`` [B, 1 + num_negatives] for dataset rows ``index`` [B]: column 0 the
        sample, then sampled other rows. Pass it to several calls (an attack's and the training
        loss's) to share their negatives. None for the queue and batch banks (nothing to sample).
        A forward call without ``contrast_index`` draws the same way, from the global RNG."""
        return self.bank_t.sample_contrast_index(index, generator)

    @torch.no_grad()
    def prefill(self, f_t: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write the teacher's embeddings of ``f_t`` [B, teacher_dim] (dataset rows ``index``) into the
        bank exactly, e.g. the whole training set once before the first step, so the negatives are
        real from the start. Meant for ``teacher_head="frozen"`` (the rows then stay exact)."""
        check_tensor("f_t", f_t, min_ndim=2)
        t = self.embed_t(f_t)
        self.bank_t.prefill(t, index)

    @torch.no_grad()
    def prefill_from(self, teacher: nn.Module, loader: Iterable[Any]) -> None:
        """Fill the bank with ``teacher``'s embeddings of a whole pass over ``loader``, before training.

        ``loader`` yields batches ``(x, y, index, ...)`` (a DataLoader over a dataset that returns
        each sample's dataset index, as the training loop's): ``x`` [B, ...] the teacher's input,
        ``index`` [B] int32/int64 dataset rows; ``y`` and any further items (CRD's ``contrast_idx``)
        are not used. Each batch is moved to the loss's device. ``teacher(x)`` returns features
        [B, teacher_dim] (any float dtype) or a ``(features, logits)`` tuple. It runs in eval mode
        without gradients, and every module's train/eval flag is restored after (also after an
        error). The rows written are exact (:meth:`prefill`): a memory bank gets row ``index`` of
        every sample seen, a queue the last ``num_negatives`` samples; in-batch negatives store
        nothing (no pass is made). The student's bank of ``symmetric=True`` is not filled. Under
        torch.distributed give every rank the whole training set (not its shard), so the banks
        stay identical on every rank.
        """
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if self.bank_t.rows_dtype is None:
            return
        device = self.embed_t.linear.weight.device
        with model_mode(teacher, "eval"):
            for number, batch in enumerate(loader):
                if not isinstance(batch, (tuple, list)) or len(batch) < 3:
                    raise ValueError(f"loader must yield (x, y, index, ...) batches; batch {number} is "
                                     f"{_describe(batch)}")
                out = teacher(batch[0].to(device))
                self.prefill(out[0] if isinstance(out, (tuple, list)) else out, batch[2].to(device))

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
            contrast_index: [B, 1 + K] CRD's sampled rows (bank="memory" only), columns 1.. the
                negatives. Column 0 is the positive for critic="crd_nce"; the other critics
                ignore it (their anchor is the teacher's embedding of the sample itself).
                Default: ``num_negatives`` rows drawn from all rows but the sample's (see
                :meth:`sample_contrast_index`).
            teacher_logits [B, C], targets [B]: for the sample weights.
            weights: [B] explicit per-sample weights (override ``weighting``).
            update_bank: update the bank with this batch (default: ``self.training``).

        Returns:
            float32 scalar (float64 for a float64 module), or [B] with reduction="none". ``f_s`` and
            ``f_t`` may be bf16/fp16 (e.g. from an autocast region): the heads cast them to their
            own dtype and run in it (an enclosing autocast region does not apply to them), the
            embeddings are cast to the stored rows' dtype (``bank_dtype``), and the loss is
            accumulated and returned in float32.
        """
        batch = self._check_inputs(f_s, f_t, index, contrast_index, update_bank)
        weights = self._sample_weights(weights, teacher_logits, targets, batch)
        index = self._dataset_index(index, batch)
        dist_on = collectives.active(self.across_ranks)
        s, t = self._embed(f_s, f_t)
        if self.critic == "crd_nce":
            terms = self._crd_terms(s, t, index, contrast_index)
        else:
            terms = self._anchored_terms(s, t, index, contrast_index, dist_on)
        loss = self._reduced_loss(terms, weights, dist_on)
        if self.training if update_bank is None else update_bank:
            self._update_banks(s, t, index, dist_on)
            self._warn_if_unfilled()
        return loss

    # -- the steps of forward, in order -----------------------------------------------------
    def _check_inputs(self, f_s, f_t, index, contrast_index, update_bank) -> int:
        """Types, shapes and devices of the call's tensors; returns the batch size B."""
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

    def _sample_weights(self, weights, teacher_logits, targets, batch: int) -> torch.Tensor | None:
        """Explicit ``weights``, else the teacher's [B] float32 (None for weighting="none")."""
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

    def _dataset_index(self, index, batch: int) -> torch.Tensor | None:
        """``index`` as [B] int64 rows of the bank when the bank needs it (checked), else as given."""
        if not self.bank_t.needs_index:
            return index
        if index is None:
            raise ValueError(f"bank={self.bank_t.kind!r} needs index, the [B] dataset indices of the batch")
        return self.bank_t.check_index("index", index, batch)

    def _embed(self, f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and teacher embeddings [B, embed_dim], in the stored rows' dtype when the bank
        stores rows, else in the heads' dtype."""
        s, t = self.embed_s(f_s), self.embed_t(f_t)
        dtype = self.bank_t.rows_dtype or s.dtype
        return s.to(dtype), t.to(dtype)

    def _anchored_terms(self, s, t, index, contrast_index, dist_on: bool) -> list[Term]:
        """GACD's terms: the student embedding against the teacher's fresh embedding of the same
        sample (the anchor) and bank_t's negatives; with ``symmetric``, the teacher embedding
        against the student's and bank_s's rows at the same sampled positions."""
        rows_t, neg_index = self.bank_t.negatives(t, index, contrast_index=contrast_index, dist_on=dist_on)
        terms = [Term(s, t, rows_t, neg_index)]
        if self.bank_s is not None:
            shared = torch.cat([index[:, None], neg_index], 1) if self.bank_s.needs_index else None
            rows_s, _ = self.bank_s.negatives(s, index, contrast_index=shared, dist_on=dist_on)
            terms.append(Term(t, s, rows_s, neg_index))
        return terms

    def _crd_terms(self, s, t, index, contrast_index) -> list[Term]:
        """CRD's ContrastMemory: each embedding against the other side's stored rows at
        ``contrast_index`` [B, 1 + K], whose column 0 (the sample's own row) is the positive.
        Without ``contrast_index`` one is drawn as :meth:`sample_contrast_index` draws it."""
        if contrast_index is None:
            contrast_index = self.sample_contrast_index(index)
        terms = []
        for query, keys, bank in ((s, t, self.bank_t), (t, s, self.bank_s)):
            if bank is not None:
                rows, neg_index = bank.negatives(keys, index, contrast_index=contrast_index)  # checks the range
                terms.append(Term(query, rows[contrast_index[:, 0].long()], rows, neg_index))
        return terms

    def _reduced_loss(self, terms: list[Term], weights, dist_on: bool) -> torch.Tensor:
        """The terms' weighted losses summed and reduced (over the global batch under
        torch.distributed: see :func:`collectives.global_reduce`)."""
        reduction = "none" if dist_on else self.reduction
        loss = sum(self._term_loss(position, term, weights, reduction, dist_on)
                   for position, term in enumerate(terms))
        return collectives.global_reduce(loss, weights, self.reduction) if dist_on else loss

    def _term_loss(self, position: int, term: Term, weights, reduction: str, dist_on: bool) -> torch.Tensor:
        """One term under the critic, weighted and reduced by the functional op."""
        query, positive, negatives, neg_index = term
        common = dict(temperature=self.temperature, weights=weights, neg_index=neg_index, reduction=reduction)
        if self.critic == "infonce":
            return gf.info_nce(query, positive, negatives, backend=self.backend, **common)
        if self.critic == "nce":
            return gf.nce_loss(query, positive, negatives, num_data=self.num_data, **common)
        # crd_nce: the stored rows are scored as they are (CRD does not re-normalise them)
        return gf.nce_loss(query, positive, negatives, num_data=self.num_data, eps=CRD_EPS, normalize=False,
                           normalizer=self._crd_normalizer(position, term, dist_on), **common)

    def _crd_normalizer(self, position: int, term: Term, dist_on: bool) -> float:
        """CRD's Z of term ``position``: set once, on the first call, to mean(exp(s/tau)) * num_data
        over the term's [B, 1 + K] scores (the global batch's under torch.distributed, so every
        rank sets the same Z), then constant. Read on the host, like CRD's ``.item()``."""
        z = float(self.crd_z[position])
        if z < 0:
            z = float(self._mean_exp_score(term, dist_on)) * self.num_data
            limit = torch.finfo(self.crd_z.dtype).max
            if not z <= limit:  # refused before anything is stored: crd_z stays unset
                raise ValueError(
                    f"CRD's normaliser Z = mean(exp(s/tau)) * num_data = {z:.3g} overflows the {self.crd_z.dtype} "
                    f"buffer crd_z (max {limit:.3g}): temperature (CRD's nce_t) {self.temperature:g} is too small "
                    f"for these scores; use a larger nce_t (CRD: 0.07)")
            self.crd_z[position] = z
            z = float(self.crd_z[position])
        return z

    @torch.no_grad()
    def _mean_exp_score(self, term: Term, dist_on: bool) -> torch.Tensor:
        """mean(exp(s/tau)) over the positive and negative scores of ``term`` in float64 (exp(s/tau)
        overflows float32 for tau below ~0.0113), over the global batch under torch.distributed."""
        query, positive, negatives, neg_index = term
        acc = torch.float64
        q, p, n = query.to(acc), positive.to(acc), negatives.to(acc)
        scores = torch.cat([(q * p).sum(1, keepdim=True), torch.einsum("bd,bmd->bm", q, n[neg_index])], 1)
        sum_and_count = torch.stack([(scores / self.temperature).exp().sum(), scores.new_tensor(scores.numel())])
        if dist_on:
            sum_and_count = collectives.all_reduce_sum(sum_and_count)
        return sum_and_count[0] / sum_and_count[1]

    def _warn_if_unfilled(self) -> None:
        """Once per loss: a UserWarning when training starts on a memory or queue bank that still
        holds its random initial rows with the frozen teacher head (its first negatives are then
        noise; prefill fixes that). CRD's trained head (``teacher_head="train"``) starts from random
        rows by design. Host-side only: skipped while torch.compile traces."""
        if torch.compiler.is_compiling() or self._checked_fill:
            return
        self._checked_fill = True
        if self.teacher_head == "frozen" and self.bank_t.rows_dtype is not None and not self.bank_t.filled:
            warnings.warn(
                f"GACDLoss starts training with an unfilled {self.bank_t.kind} bank: its negatives are random "
                "rows until training overwrites them, which was measured to weaken the distilled features. "
                "Fill it first: crit.prefill_from(teacher, loader) (or crit.prefill(f_t, index))",
                UserWarning, stacklevel=2)

    def _update_banks(self, s: torch.Tensor, t: torch.Tensor, index, dist_on: bool) -> None:
        """Remember this batch: teacher embeddings in bank_t, student embeddings in bank_s. Both are
        checked before either is written, so a refused row (NaN, inf) leaves the banks in step."""
        if self.bank_s is not None:
            self.bank_t.check_update(t.detach(), index)
            self.bank_s.check_update(s.detach(), index)
        self.bank_t.update(t.detach(), index, dist_on=dist_on)
        if self.bank_s is not None:
            self.bank_s.update(s.detach(), index, dist_on=dist_on)


def _as_float32(name: str, value: object) -> float:
    """``value`` rounded to float32 and back (CRD keeps nce_t and nce_m in a float32 buffer)."""
    return float(torch.tensor(check_real(f"opt.{name}", value), dtype=torch.float32))


def _describe(batch: object) -> str:
    """A short description of a loader's batch for an error message."""
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return f"a {type(batch).__name__}"
