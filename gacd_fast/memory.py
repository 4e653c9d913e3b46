"""Memories of embeddings that supply the negatives: CRD's per-sample bank and MoCo's queue.

Both keep their rows in buffers (state_dict, ``.to(device)``). Updates replace the buffer with an
updated copy instead of writing in place: the rows handed to the loss may be saved by autograd for
backward (by any backend), and an in-place write would corrupt that graph. The copy is one bank's
size per step, small next to a training step's forward and backward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_index_range, check_int, check_real, check_tensor, INDEX_DTYPES
from .ops.reference import NORM_EPS


class MemoryBank(nn.Module):
    """CRD-style memory: one row per training sample, updated with momentum.

    ``rows``: [num_data, dim] float32, initialised U(-stdv, stdv) with stdv = 1/sqrt(dim/3) as in CRD.
    """

    def __init__(self, num_data: int, dim: int, momentum: float = 0.5) -> None:
        super().__init__()
        check_int("num_data", num_data, minimum=2)
        check_int("dim", dim, minimum=1)
        self.momentum = check_real("momentum", momentum)
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        stdv = 1.0 / math.sqrt(dim / 3)
        self.register_buffer("rows", torch.rand(num_data, dim).mul_(2 * stdv).add_(-stdv))

    @property
    def num_data(self) -> int:
        return self.rows.shape[0]

    def sample_negatives(self, index: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B] sample rows -> [B, k] int64 rows drawn uniformly (with replacement) from the other rows.

        A sample's own row is never drawn: draw from num_data - 1 values and skip over ``index``.
        """
        r = torch.randint(self.num_data - 1, (index.shape[0], k), device=index.device, generator=generator)
        return r + (r >= index[:, None]).long()

    @torch.no_grad()
    def update(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """rows[index] <- normalize(m * rows[index] + (1 - m) * values) (out of place, see module doc)."""
        v = values.detach().to(self.rows.dtype)
        mixed = self.rows[index] * self.momentum + v * (1 - self.momentum)
        self.rows = self.rows.index_copy(0, index, F.normalize(mixed, dim=1, eps=NORM_EPS))

    def check_index(self, name: str, index: torch.Tensor) -> torch.Tensor:
        check_tensor(name, index, ndim=1, dtypes=INDEX_DTYPES)
        check_index_range(name, index, self.num_data, "rows of the memory bank (dataset indices)")
        return index.long()


class FeatureQueue(nn.Module):
    """MoCo-style FIFO of the last ``size`` embeddings; starts as random unit rows like MoCo.

    ``rows``: [size, dim] float32; ``ptr``: int64 scalar, the next row to overwrite (kept a tensor
    so enqueue needs no host sync).
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        check_int("size", size, minimum=1)
        check_int("dim", dim, minimum=1)
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, values: torch.Tensor) -> None:
        """Write ``values`` [B, dim] over the oldest rows, in order (only the last ``size`` if B > size)."""
        size = self.rows.shape[0]
        v = values.detach().to(self.rows.dtype)[-size:]
        slots = (self.ptr + torch.arange(v.shape[0], device=v.device)) % size
        self.rows = self.rows.index_copy(0, slots, v)
        self.ptr = (self.ptr + v.shape[0]) % size
