"""Multi-process training of the pipeline under ``torchrun`` (torch.distributed).

Launched by torchrun (WORLD_SIZE > 1), the pipeline starts a process group (NCCL on GPUs, one
per process at cuda:LOCAL_RANK; gloo on the CPU), shards each global batch over the ranks,
averages the parameter gradients over the ranks after backward (what DDP does, without wrapping
the model: the PGD attacks call the model many times with input-only gradients, which DDP's
reducer does not expect) and broadcasts the model's buffers (BatchNorm statistics) from rank 0
after each step (DDP's ``broadcast_buffers=True``). Rank 0 alone logs and writes files.

Environment: GACD_FAST_DIST_TIMEOUT, the collectives' timeout in seconds (default 1800).
"""
from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

TIMEOUT_ENV = "GACD_FAST_DIST_TIMEOUT"


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by torchrun (or similar) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_context() -> Context:
    """Rank, world size and local rank from the environment torchrun sets."""
    if not launched():
        return Context()
    return Context(int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def current() -> Context:
    """The process group's context when one is initialised, else a single process."""
    if not initialized():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    """Rank 0 of the process group, or of torchrun's launch when no group is up (yet or any more)."""
    return (current() if initialized() else env_context()).is_main


def _device_for(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # one GPU per process
        return torch.device("cuda", local_rank)
    return torch.device(name)


def setup(device_name: str = "auto") -> torch.device:
    """Under torchrun: start the process group (once) and return this rank's device; else
    the device ``device_name`` names ("auto": cuda when available)."""
    from .runs import resolve_device  # a device that does not exist here is a RunError naming --device

    ctx = env_context()
    if not ctx.enabled:
        return resolve_device(device_name)
    resolve_device(device_name)
    device = _device_for(device_name, ctx.local_rank)
    if not initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    return device


def shutdown() -> None:
    """Leave the process group on every rank: a barrier first (gloo's destructor can deadlock
    when torn down while its threads are still busy), then destroy it."""
    if initialized():
        dist.barrier()
        dist.destroy_process_group()


def abort(code: int) -> None:
    """Leave at once after an error on this rank: no barrier (the others may never reach it)
    and no process-group destructor (it can hang); torchrun then stops the other ranks."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier() -> None:
    if initialized():
        dist.barrier()


def _groups(tensors: Iterable[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


@torch.no_grad()
def broadcast_tensors(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` (in place) with rank ``src``'s values: one collective per dtype."""
    for (_, _), idx in _groups(tensors).items():
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        dist.broadcast(flat, src)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Every parameter and buffer of ``module`` from rank ``src``."""
    broadcast_tensors([p.data for p in module.parameters()] + list(module.buffers()), src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    bufs = list(module.buffers())
    if bufs:
        broadcast_tensors(bufs, src)


@torch.no_grad()
def average_gradients(params: list[torch.Tensor]) -> None:
    """p.grad <- (sum over ranks of p.grad) / world size, as DDP averages; a gradient that is
    None on every rank stays None (so that SGD skips it as one process would), one missing on
    some ranks only counts as zero there. One all_reduce per (device, dtype)."""
    world = dist.get_world_size()
    for (device, dtype), idx in _groups(params).items():
        grads = [params[i].grad for i in idx]
        flat = torch.cat([g.reshape(-1) if g is not None else torch.zeros(params[i].numel(), device=device, dtype=dtype)
                          for i, g in zip(idx, grads)]
                         + [torch.tensor([float(g is not None) for g in grads], device=device, dtype=dtype)])
        dist.all_reduce(flat)
        has = flat[-len(idx):].tolist()  # one device sync, not one per parameter
        offset = 0
        for k, i in enumerate(idx):
            p = params[i]
            n = p.numel()
            if has[k] > 0:
                avg = flat[offset:offset + n].view_as(p).div_(world)
                if p.grad is None:
                    p.grad = avg.clone()
                else:
                    p.grad.copy_(avg)
            offset += n


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sums over ranks of a list of numbers (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
