"""The pipeline under torch.distributed: data sharding, 2 gloo ranks against one process,
--resume across ranks, and a 2-rank `torchrun ... demo` end to end.

Every process ends robustly: spawned workers leave with os._exit after a barrier (gloo's process
group can deadlock in its destructor), process groups have a 60 s timeout and subprocesses a
`timeout`, so that nothing can hang the test run."""
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gacd_fast.distill import parallel, train
from gacd_fast.distill.data import ImageDataset, iterate, load_digits_split
from gacd_fast.distill.config import DistillConfig, resolve
from gacd_fast.distill.method_registry import build_method
from gacd_fast.distill.methods import AttackSpec, MethodInputs, Natural
from gacd_fast.distill.models import build_model

from multiproc import free_port, run_rank
from test_pipeline_cli import check_results_schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORLD = 2

pytestmark = pytest.mark.distributed



def toy_data(n: int) -> ImageDataset:
    g = torch.Generator().manual_seed(3)
    return ImageDataset(torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8),
                        torch.randint(0, 4, (n,), generator=g), 4, "toy")


@pytest.mark.parametrize("world,n,batch", [(2, 40, 16), (3, 22, 10), (4, 9, 8)])
def test_shards_make_up_one_process_batches(world, n, batch):
    """The ranks' parts of each batch, in rank order, are one process's batch (same augmentation);
    the generator advances the same on every rank; no rank gets an empty batch."""
    data = toy_data(n)
    one = list(iterate(data, batch, shuffle=True, generator=torch.Generator().manual_seed(1), augment=True))
    gens = [torch.Generator().manual_seed(1) for _ in range(world)]
    parts = [list(iterate(data, batch, shuffle=True, generator=gens[r], augment=True, rank=r, world_size=world))
             for r in range(world)]
    assert all(len(p) == len(one) for p in parts)
    for b, (x, y, idx) in enumerate(one):
        xs, ys, ids = (torch.cat([parts[r][b][k] for r in range(world)]) for k in range(3))
        assert all(parts[r][b][2].numel() >= 1 for r in range(world))
        if idx.numel() >= world:
            assert torch.equal(ids, idx) and torch.equal(ys, y) and torch.equal(xs, x)
        else:  # topped up from the start of the order
            assert torch.equal(ids[:idx.numel()], idx) and ids.numel() == world
    assert all(torch.equal(g.get_state(), gens[0].get_state()) for g in gens)
    # across an epoch the shards are disjoint and cover the data
    seen = [torch.cat([bt[2] for bt in p]) for p in parts]
    if n % batch == 0 or n % batch >= world:
        assert sorted(torch.cat(seen).tolist()) == list(range(n))


class MLP(nn.Module):
    """No BatchNorm: one process on the global batch and ranks on its halves then compute the
    same gradients."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        f = self.body(x)
        return f, self.fc(f)


def digits(n: int) -> ImageDataset:
    return load_digits_split(seed=0)[0].subset(n, 0)


FIT = dict(epochs=2, batch_size=16, lr=0.1, device=torch.device("cpu"), seed=0, log=lambda m: None)


def natural_weights() -> dict:
    model = MLP()
    train.fit(model, Natural(), digits(64), **FIT)
    return model.state_dict()


def gacd_run(state_path: str, *, stop_after: int | None = None, resume: bool = False, method_name: str = "gacd"):
    torch.manual_seed(0)
    teacher = build_model("small_cnn_teacher", 10, 1).eval()
    student = build_model("small_cnn_student", 10, 1)
    # iad_begin 0.5: IAD's introspection starts in epoch 2, after the interruption
    cfg = resolve(DistillConfig(embed_dim=8, num_negatives=16, epochs=FIT["epochs"], batch_size=FIT["batch_size"],
                                iad_begin=0.5))
    method = build_method("student", method_name, cfg,
                          MethodInputs(AttackSpec(0.2, 0.05, 2), teacher, student.feature_dim, 64))

    def stop(tag, epoch):
        if epoch == stop_after:
            raise KeyboardInterrupt
    try:
        train.fit(student, method, digits(64), state_path=state_path, resume=resume, test=digits(20),
                  callbacks=[stop] if stop_after else (), **FIT)
    except KeyboardInterrupt:
        return None
    return student.state_dict(), method.state_dict()


def _worker_body(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    nat = natural_weights()
    if rank == 0:
        torch.save(nat, os.path.join(out, "natural.pt"))
    # GACD (BatchNorm, PGD random starts, memory negatives: per-rank RNG), IAD (a step counter) and
    # AdaAD (the attack through student and teacher): uninterrupted vs interrupted + --resume
    for name in ("gacd", "iad", "adaad"):
        full = gacd_run(os.path.join(out, f"{name}_full.state.pt"), method_name=name)
        dist.barrier()
        assert gacd_run(os.path.join(out, f"{name}_res.state.pt"), stop_after=1, method_name=name) is None
        dist.barrier()
        state = torch.load(os.path.join(out, f"{name}_res.state.pt"), weights_only=True)
        assert state["epoch"] == 1 and state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD
        resumed = gacd_run(os.path.join(out, f"{name}_res.state.pt"), resume=True, method_name=name)
        for a, b in zip(full, resumed):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: resume is not exact"
        # the ranks hold the same student and the same method state (GACD's memory, IAD's step count)
        everyone = parallel.all_gather_object(full)
        for a, b in zip(everyone[0], everyone[1]):
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: ranks differ"
        if name == "iad":
            assert int(full[1]["steps_done"]) == 2 * 4  # 2 epochs of ceil(64 / 16) global batches on every rank
        dist.barrier()


def worker(rank: int, port: int, out: str) -> None:
    run_rank(_worker_body, rank, port, out)


def test_two_ranks_fit_equals_one_process_and_resumes_exactly(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    two = torch.load(tmp_path / "natural.pt", weights_only=True)
    one = natural_weights()  # one process, the whole batch
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def torchrun(*args: str, timeout: int = 150) -> subprocess.CompletedProcess:
    env = {**os.environ, "GACD_FAST_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "gacd_fast", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_torchrun_demo_two_ranks(tmp_path):
    out = str(tmp_path / "demo")
    r = torchrun("demo", "--out", out, "--teacher-epochs", "1", "--student-epochs", "2", "--attack-steps", "1",
                 "--probe-epochs", "2", "--eps-sweep", "2", "--train-limit", "64", "--test-limit", "16",
                 "--batch-size", "16", "--methods", "natural", "gacd", "--no-progress")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = ("teacher", "natural", "gacd")
    log = open(os.path.join(out, "log.txt")).read()
    for text in ("[gacd] epoch   2/2 loss", "[teacher] saved", "[eval] wrote", "[gacd] torch.distributed: 2 processes (gloo)"):
        assert log.count(text) == 1 and r.stdout.count(text) == 1, text  # rank 0 alone logs, once
    for name in names:
        assert os.path.isfile(os.path.join(out, f"{name}.pt"))
        assert not os.path.exists(os.path.join(out, f"{name}.state.pt"))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    doc = json.load(open(os.path.join(out, "results.json")))
    check_results_schema(doc, names)
    curves = json.load(open(os.path.join(out, "curves.json")))
    assert [row["epoch"] for row in curves["training"]["gacd"]] == [1, 2]
    assert all(0 <= row["train_acc"] <= 1 and row["loss"] > 0 for row in curves["training"]["gacd"])
    ckpt = torch.load(os.path.join(out, "gacd.pt"), weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())

    # an error on the ranks ends the run with an error, not a hang
    r = torchrun("distill", "--method", "gacd", "--out", str(tmp_path / "bad"), "--no-progress", timeout=90)
    assert r.returncode != 0 and "--teacher" in r.stderr
