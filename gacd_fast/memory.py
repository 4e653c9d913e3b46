"""Sources of negatives for GACDLoss: one small interface, three kinds.

A :class:`NegativeBank` answers two questions per batch: which rows are the negatives of each
query (:meth:`~NegativeBank.negatives`), and what to remember of this batch afterwards
(:meth:`~NegativeBank.update`). :meth:`~NegativeBank.prefill` writes exact rows before training.

- :class:`MemoryBank` (CRD): one row per training sample, momentum-updated; negatives are
  ``num_negatives`` rows sampled per query (never the query's own row).
- :class:`FeatureQueue` (MoCo): a FIFO of the last ``size`` embeddings; every row is a negative.
- :class:`BatchNegatives`: the other samples' keys of the (global) batch; nothing is stored.

Stored rows are constants (no gradient), float32 by default or bfloat16 (``dtype=``: half the
memory; updates mix in float32 and round once). Updates replace the buffer with an updated copy instead of
writing in place: the rows handed to the loss may be saved by autograd for backward (by any
backend), and an in-place write would corrupt that graph. The copy is one bank's size per step,
small next to a training step's forward and backward.

Under torch.distributed every rank stores every rank's rows, in rank order, so the banks stay
identical on every rank and N processes compute what one process does on the global batch.

:data:`BANKS` maps each kind's name to its class; GACDLoss's ``bank=`` and the CLI's ``--bank``
choices derive from it, and :meth:`NegativeBank.from_options` builds any kind from GACDLoss's options.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import collectives
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_int,
    check_real,
    check_tensor,
    reads_values,
)
from ._numerics import NORM_EPS, acc_dtype

#: ``bank_dtype=`` names -> the stored rows' dtype (memory and queue banks)
BANK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class NegativeBank(nn.Module):
    """The interface GACDLoss uses; subclasses hold the rows (if any) and the update rule."""

    #: the kind's name, GACDLoss's ``bank=`` value
    kind = ""
    #: whether :meth:`negatives` needs the samples' dataset indices
    needs_index = False

    def __init__(self) -> None:
        super().__init__()
        # True once rows were written by prefill or loaded from a state dict (a resumed run): no
        # longer the random start. A plain attribute, so checkpoints keep their keys.
        self.filled = False
        self.register_load_state_dict_post_hook(_mark_filled)

    @classmethod
    def from_options(cls, *, num_data: int | None, dim: int, momentum: float, num_negatives: int,
                     dtype: torch.dtype) -> "NegativeBank":
        """This kind for ``dim``-wide embeddings from GACDLoss's options (each kind takes the ones
        it uses): ``num_data`` rows, ``momentum``, ``num_negatives`` (sampled rows or queue length),
        ``dtype`` of the stored rows."""
        raise NotImplementedError

    @property
    def rows_dtype(self) -> torch.dtype | None:
        """dtype of the stored rows (None: nothing stored); keys are cast to it."""
        rows = getattr(self, "rows", None)
        return rows.dtype if rows is not None else None

    def negatives(
        self,
        keys: torch.Tensor,
        index: torch.Tensor | None = None,
        *,
        contrast_index: torch.Tensor | None = None,
        dist_on: bool = False,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Negatives of a batch whose own keys (the positives) are ``keys`` [B, D].

        ``contrast_index``: CRD's [B, 1 + K] sampled rows (see :meth:`sample_contrast_index`), used
        by the kinds that sample and ignored by the others. Returns ``(rows [N, D], neg_index)``:
        ``neg_index`` None means every row is a negative of every query, else [B, M] int64 rows of
        ``rows`` per query.
        """
        raise NotImplementedError

    def sample_contrast_index(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """CRD's ``contrast_idx`` [B, 1 + K] for dataset rows ``index`` [B], to share one draw of
        negatives between calls; None for the kinds that draw nothing."""
        return None

    def update(self, keys: torch.Tensor, index: torch.Tensor | None = None, *, dist_on: bool = False) -> None:
        """Remember the batch's ``keys`` [B, D] (dataset rows ``index`` [B]); no-op by default."""

    def check_update(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Raise what :meth:`update` would raise for these arguments, writing nothing (so that a
        caller updating several banks can refuse before any of them changes); no-op by default."""

    def prefill(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Write exact rows (no momentum), e.g. the frozen teacher's embeddings of the training set
        before the first step; no-op by default."""

    # -- shared by the kinds that store rows -----------------------------------------------
    def _check_rows(self, name: str, values: torch.Tensor, dim: int) -> torch.Tensor:
        """[B, dim] floating rows, finite (a NaN/inf row would poison every later loss)."""
        check_tensor(name, values, ndim=2, dtypes=FLOAT_DTYPES)
        if values.shape[1] != dim:
            raise ValueError(f"{name} must have shape (B, {dim}) (one row per sample), got {tuple(values.shape)}")
        if reads_values(values) and not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} holds NaN or inf; refusing to store them in the {type(self).__name__} "
                             "(nothing was written)")
        return values.detach()

    @staticmethod
    def _gather(values: torch.Tensor, index: torch.Tensor | None, dist_on: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every rank's rows (and indices) in rank order under torch.distributed."""
        if not dist_on:
            return values, index
        values = collectives.all_gather_rows(values)
        return values, collectives.all_gather_rows(index) if index is not None else None


def _mark_filled(bank: NegativeBank, _incompatible_keys: object) -> None:
    """load_state_dict post-hook: loaded rows are a checkpoint's, not the random start."""
    bank.filled = True


def _rows_dtype(dtype: object) -> torch.dtype:
    """The stored rows' dtype: float32 or bfloat16 (:data:`BANK_DTYPES`)."""
    if dtype not in BANK_DTYPES.values():
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16 (the stored rows), got {dtype!r}")
    return dtype  # type: ignore[return-value]


class MemoryBank(NegativeBank):
    """CRD-style memory: one row per training sample, updated with momentum.

    ``rows``: [num_data, dim] of ``dtype`` (float32 or bfloat16), initialised U(-stdv, stdv) with
    stdv = 1/sqrt(dim/3) as in CRD (drawn in float32, then rounded; until :meth:`prefill` or the
    sample's first update replaces it).
    """

    kind = "memory"
    needs_index = True

    def __init__(self, num_data: int, dim: int, momentum: float = 0.5, num_negatives: int = 16384, *,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_int("num_data", num_data, minimum=2)
        check_int("dim", dim, minimum=1)
        self.num_negatives = check_int("num_negatives", num_negatives, minimum=1)
        self.momentum = check_real("momentum", momentum)
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("rows", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv).to(_rows_dtype(dtype)))

    @classmethod
    def from_options(cls, *, num_data, dim, momentum, num_negatives, dtype):
        return cls(num_data, dim, momentum, num_negatives, dtype=dtype)

    @property
    def num_data(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def check_index(self, name: str, index: object, batch: int | None = None) -> torch.Tensor:
        """[B] int32/int64 dataset rows in [0, num_data) -> int64."""
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of dataset indices, got {type(index).__name__}")
        check_tensor(name, index, ndim=1, dtypes=INDEX_DTYPES)
        if batch is not None and index.shape[0] != batch:
            raise ValueError(f"{name} must have shape ({batch},) (one dataset index per sample), got {tuple(index.shape)}")
        check_index_range(name, index, self.num_data, "rows of the memory bank (dataset indices)")
        return index.long()

    def sample_negatives(self, index: torch.Tensor, k: int | None = None,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """[B] sample rows -> [B, k] int64 rows drawn uniformly (with replacement) from the other rows.

        A sample's own row is never drawn: draw from num_data - 1 values and skip over ``index``.
        ``k`` defaults to ``num_negatives``.
        """
        index = self.check_index("index", index)
        k = self.num_negatives if k is None else check_int("k", k, minimum=1)
        r = torch.randint(self.num_data - 1, (index.shape[0], k), device=index.device, generator=generator)
        return r + (r >= index[:, None]).long()

    def sample_contrast_index(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        negs = self.sample_negatives(index, generator=generator)
        return torch.cat([index.long()[:, None], negs], 1)

    def negatives(self, keys, index=None, *, contrast_index=None, dist_on=False, generator=None):
        if contrast_index is None:
            if index is None:
                raise ValueError(f"bank={self.kind!r} needs index, the [B] dataset indices of the batch")
            return self.rows, self.sample_negatives(index, generator=generator)
        check_index_range("contrast_index", contrast_index, self.num_data, "rows of the memory bank")
        return self.rows, contrast_index[:, 1:].long()  # column 0 is the sample itself

    def _rows_and_index(self, what: str, keys: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if index is None:
            raise ValueError(f"MemoryBank.{what} needs index, the [B] dataset indices of the rows")
        v = self._check_rows("keys", keys, self.dim)
        return v, self.check_index("index", index, v.shape[0])

    def check_update(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self._rows_and_index("update", keys, index)

    @torch.no_grad()
    def update(self, keys: torch.Tensor, index: torch.Tensor | None = None, *, dist_on: bool = False) -> None:
        """rows[index] <- normalize(m * rows[index] + (1 - m) * keys) (out of place, see module doc)."""
        v, index = self._gather(*self._rows_and_index("update", keys, index), dist_on)
        acc = acc_dtype(self.rows.dtype)  # mixed and normalised in float32, rounded once to the rows' dtype
        mixed = self.rows[index].to(acc) * self.momentum + v.to(acc) * (1 - self.momentum)
        self.rows = self.rows.index_copy(0, index, F.normalize(mixed, dim=1, eps=NORM_EPS).to(self.rows.dtype))

    @torch.no_grad()
    def prefill(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """rows[index] <- normalize(keys), exactly."""
        v, index = self._rows_and_index("prefill", keys, index)
        unit = F.normalize(v.to(acc_dtype(self.rows.dtype)), dim=1, eps=NORM_EPS)
        self.rows = self.rows.index_copy(0, index, unit.to(self.rows.dtype))
        self.filled = True


class FeatureQueue(NegativeBank):
    """MoCo-style FIFO of the last ``size`` embeddings; starts as random unit rows like MoCo.

    ``rows``: [size, dim] of ``dtype`` (float32 or bfloat16); ``ptr``: int64 scalar, the next row
    to overwrite (kept a tensor so enqueue needs no host sync).
    """

    kind = "queue"

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        check_int("size", size, minimum=1)
        check_int("dim", dim, minimum=1)
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1).to(_rows_dtype(dtype)))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @classmethod
    def from_options(cls, *, num_data, dim, momentum, num_negatives, dtype):
        return cls(num_negatives, dim, dtype=dtype)

    def negatives(self, keys, index=None, *, contrast_index=None, dist_on=False, generator=None):
        return self.rows, None

    @torch.no_grad()
    def enqueue(self, values: torch.Tensor) -> None:
        """Write ``values`` [B, dim] over the oldest rows, in order (only the last ``size`` if B > size)."""
        size = self.rows.shape[0]
        v = self._check_rows("values", values, self.rows.shape[1]).to(self.rows.dtype)[-size:]
        slots = (self.ptr + torch.arange(v.shape[0], device=v.device)) % size
        self.rows = self.rows.index_copy(0, slots, v)
        self.ptr = (self.ptr + v.shape[0]) % size

    def check_update(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self._check_rows("keys", keys, self.rows.shape[1])

    def update(self, keys: torch.Tensor, index: torch.Tensor | None = None, *, dist_on: bool = False) -> None:
        self.enqueue(self._gather(self._check_rows("keys", keys, self.rows.shape[1]), None, dist_on)[0])

    def prefill(self, keys: torch.Tensor, index: torch.Tensor | None = None) -> None:
        self.enqueue(keys)
        self.filled = True


class BatchNegatives(NegativeBank):
    """In-batch negatives: every other key of the batch (of the global batch under
    torch.distributed, gathered with gradients so that each rank's keys get theirs back)."""

    kind = "batch"

    @classmethod
    def from_options(cls, *, num_data, dim, momentum, num_negatives, dtype):
        return cls()

    def negatives(self, keys, index=None, *, contrast_index=None, dist_on=False, generator=None):
        batch = keys.shape[0]
        offset, total = collectives.rank_offset(batch, keys.device) if dist_on else (0, batch)
        if total < 2:
            raise ValueError("bank='batch' needs at least 2 samples in the (global) batch")
        all_keys = collectives.all_gather_rows(keys, grad=True) if dist_on else keys
        own = torch.arange(offset, offset + batch, device=keys.device)[:, None]
        others = torch.arange(total - 1, device=keys.device)[None, :].expand(batch, -1)
        return all_keys, others + (others >= own).long()


#: the bank kinds by name (GACDLoss's ``bank=``, the CLI's ``--bank``), each class keyed by its ``kind``
BANKS: dict[str, type[NegativeBank]] = {bank.kind: bank for bank in (MemoryBank, FeatureQueue, BatchNegatives)}
