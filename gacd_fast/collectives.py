"""The collectives GACDLoss uses under torch.distributed (DDP / torchrun).

Everything is arranged so that N processes, each holding a shard of the batch, compute what one
process would on the concatenated global batch (rank order): the memories receive every rank's
rows, and the reduced loss is scaled so that DDP's gradient average equals the single-process
gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def active(flag: bool | None) -> bool:
    """Whether to act distributed: ``flag`` if given (True needs a process group), else whether
    a process group is initialised."""
    initialised = dist.is_available() and dist.is_initialized()
    if flag is True and not initialised:
        raise RuntimeError("distributed=True needs an initialised process group (torch.distributed.init_process_group)")
    return initialised if flag is None else flag


def world_size() -> int:
    return dist.get_world_size()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor, no gradient)."""
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def all_gather_rows(x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """Concatenate every rank's ``x`` [n_r, ...] along dim 0 in rank order (ranks may differ in n_r).

    ``grad=True`` keeps the gradient: each rank's slice sends its gradient back to that rank
    (summed over the ranks that used it).
    """
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = x if x.shape[0] == longest else torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    if grad:
        import torch.distributed.nn.functional as dist_fn  # gradient-aware collectives

        parts = dist_fn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.detach().contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def rank_offset(n_local: int, device: torch.device) -> tuple[int, int]:
    """(offset of this rank's rows in the global batch, global batch size)."""
    sizes = all_gather_rows(torch.tensor([n_local], device=device))
    rank = dist.get_rank()
    return int(sizes[:rank].sum()), int(sizes.sum())


def global_reduce(weighted_rows: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce this rank's per-row ``w * l`` [B_r] so that averaging gradients over the ranks (DDP)
    gives the gradient of the same reduction over the global batch.

    "sum": W * sum_r; "mean": W * sum_r / (sum of the weights over all ranks), 0 when that sum is 0
    (W the world size). The value on one rank is its share times W; the ranks' mean is the global
    loss. "none": the rows unchanged.
    """
    if reduction == "none":
        return weighted_rows
    total = weighted_rows.sum() * world_size()
    if reduction == "sum":
        return total
    local = weights.detach().to(total.dtype).sum() if weights is not None else total.new_tensor(float(weighted_rows.shape[0]))
    denom = all_reduce_sum(local)
    return total / torch.where(denom == 0, torch.ones_like(denom), denom)
