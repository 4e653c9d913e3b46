"""GACDLoss under torch.distributed: 2 gloo processes on loopback, wrapped in DDP, against one
process on the concatenated batch (unequal shards: 5 + 3 rows). Over several SGD steps the
gradients, the parameters, the memories and the loss must agree."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gacd_fast import GACDLoss
from multiproc import free_port, run_rank

SHARDS = (5, 3)
STEPS = 3
CASES = {
    "queue": dict(bank="queue", num_negatives=11),
    "memory": dict(bank="memory", num_negatives=6),
    "memory_symmetric_sum": dict(bank="memory", num_negatives=6, symmetric=True, reduction="sum"),
    "batch_symmetric": dict(bank="batch", symmetric=True, weighting="correct"),
    "queue_trained_teacher_head": dict(bank="queue", num_negatives=11, teacher_head="train"),
    # CRD: Z is set from the global first batch, so every rank's Z is one process's
    "crd_nce": dict(bank="memory", num_negatives=6, symmetric=True, critic="crd_nce", teacher_head="train"),
}

pytestmark = pytest.mark.distributed


class Pair(nn.Module):
    def __init__(self, case: dict) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(10, 12)
        self.crit = GACDLoss(12, 14, num_data=40, embed_dim=8, **{"weighting": "confidence", **case})
        self.double()  # float64, so that summation order cannot hide a wrong formula

    def forward(self, x, f_t, idx, contrast, logits, y):
        return self.crit(self.student(x), f_t, idx, contrast, teacher_logits=logits, targets=y)


def batches(step: int):
    g = torch.Generator().manual_seed(100 + step)
    n = sum(SHARDS)
    idx = torch.randperm(40, generator=g)[:n]
    contrast = torch.cat([idx[:, None], torch.randint(40, (n, 6), generator=g)], 1)
    f64 = dict(generator=g, dtype=torch.float64)
    return (torch.randn(n, 10, **f64), torch.randn(n, 14, **f64), idx, contrast,
            torch.randn(n, 3, **f64), torch.randint(3, (n,), generator=g))


def check(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")


def _run(rank: int, port: int, case_name: str) -> None:
    # a collective that waits past the timeout fails instead of hanging the test run
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    case = CASES[case_name]
    ref = Pair({**case, "distributed": False})
    ours = Pair(case)
    ddp = DDP(ours, broadcast_buffers=False)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.5)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    lo = sum(SHARDS[:rank])
    for step in range(STEPS):
        data = batches(step)
        loss_ref = ref(*data)
        opt_ref.zero_grad()
        loss_ref.backward()
        loss = ddp(*(t[lo:lo + SHARDS[rank]] for t in data))
        opt.zero_grad()
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        check(mean_loss / 2, loss_ref.detach(), f"{case_name} step {step} loss")
        for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
            check(p.grad, p_ref.grad, f"{case_name} step {step} grad {name}")
        opt_ref.step()
        opt.step()
        for (name, b_ref), b in zip(ref.named_buffers(), ours.buffers()):
            check(b, b_ref, f"{case_name} step {step} buffer {name}")
    dist.barrier()


def worker(rank: int, port: int, case_name: str) -> None:
    run_rank(_run, rank, port, case_name)



@pytest.mark.parametrize("case_name", list(CASES))
def test_two_ranks_equal_one_process(case_name):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(worker, args=(free_port(), case_name), nprocs=2, join=True)


def test_distributed_true_without_group_is_an_error():
    crit = GACDLoss(4, 4, embed_dim=2, num_negatives=3, bank="queue", weighting="none", distributed=True)
    with pytest.raises(RuntimeError, match="process group"):
        crit(torch.randn(2, 4), torch.randn(2, 4))


def test_batch_bank_single_process():
    crit = GACDLoss(4, 6, embed_dim=3, bank="batch", weighting="none")
    f_s, f_t = torch.randn(5, 4, requires_grad=True), torch.randn(5, 6)
    loss = crit(f_s, f_t)
    s, t = crit.embed_s(f_s), crit.embed_t(f_t)
    # row i: positive t_i, negatives every other t_j
    logits = (nn.functional.normalize(s, dim=1) @ nn.functional.normalize(t, dim=1).t()) / 0.07
    want = nn.functional.cross_entropy(logits, torch.arange(5))
    torch.testing.assert_close(loss, want)
    loss.backward()
    with pytest.raises(ValueError, match="at least 2"):
        crit(f_s[:1], f_t[:1])
