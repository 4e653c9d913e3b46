"""FeatureTap: any logits-only model as a (features, logits) model, through a forward hook; under
the attacks, torch.compile and DDP (2 gloo ranks); clear errors."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gacd_fast import PGD, FeatureTap, GACDLoss

from multiproc import free_port, run_rank
from robustbench_style import WideResNet


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


class Pair(nn.Module):
    """The same MLP written to return (penultimate, logits) itself: what FeatureTap must reproduce."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        f = self.m[2](self.m[1](self.m[0](x)))
        return f, self.m[3](f)


def test_default_is_the_input_of_the_last_linear():
    m = mlp()
    tap = FeatureTap(m)
    x = torch.rand(5, 1, 8, 8)
    f, logits = tap(x)
    want_f, want_logits = Pair(m)(x)
    assert tap.tapped == "3" and tap.feature_dim == 32 and f.shape == (5, 32)
    assert torch.equal(f, want_f) and torch.equal(logits, want_logits) and torch.equal(logits, m(x))
    assert not tap._kept  # nothing of the call is kept after it


def test_named_layer_flattened_and_differentiable():
    torch.manual_seed(0)
    wrn = WideResNet().eval()
    tap = FeatureTap(wrn, "block2.layer.0.relu2")
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    assert tap.feature_dim is None and tap.infer_feature_dim(x) == 16 * 4 * 4
    f, logits = tap(x)
    assert f.shape == (3, 256) and logits.shape == (3, 10)
    (g,) = torch.autograd.grad(f.sum(), x)
    assert g.abs().sum() > 0  # the features keep their graph
    # infer_feature_dim restores the train/eval flags
    wrn.train()
    tap.infer_feature_dim(x.detach())
    assert all(m.training for m in wrn.modules())


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"no submodule named 'block3.layr'.*did you mean \['block3.layer'"):
        FeatureTap(WideResNet(), "block3.layr")
    with pytest.raises(ValueError, match="has none: pass layer="):
        FeatureTap(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        FeatureTap(lambda x: x)
    m = WideResNet()
    m.unused = nn.ReLU()  # a submodule the forward never calls
    with pytest.raises(RuntimeError, match="'unused' was not called"):
        FeatureTap(m, "unused")(torch.rand(2, 1, 8, 8))
    with pytest.raises(TypeError, match=r"returns \[B, C\] logits"):
        FeatureTap(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Unflatten(1, (2, 5))), "1")(torch.rand(2, 1, 8, 8))


def test_under_pgd_as_a_features_logits_model():
    """PGD on the tap equals PGD on the hand-written (features, logits) model, with CE and with a
    loss on the features (GACD's guided attack)."""
    m = mlp()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for loss in ("ce", lambda out, _y: out[0].pow(2).sum()):
        got = PGD(FeatureTap(m), 0.1, 0.03, 5, loss=loss, generator=torch.Generator().manual_seed(1))(x, y)
        want = PGD(Pair(m), 0.1, 0.03, 5, loss=loss, generator=torch.Generator().manual_seed(1))(x, y)
        assert torch.equal(got, want)
    crit = GACDLoss(32, 32, num_data=6, embed_dim=8, num_negatives=4, bank="batch", weighting="none")
    f, _ = FeatureTap(m)(x)
    crit(f, f.detach(), torch.arange(6)).backward()  # a student's features train through the tap


@pytest.mark.slow
def test_torch_compile_matches_eager():
    for tap in (FeatureTap(mlp()), FeatureTap(mlp(), "2")):  # the input of the head, a named layer's output
        x = torch.rand(4, 1, 8, 8, requires_grad=True)
        compiled = torch.compile(tap, fullgraph=True)
        (f1, l1), (f2, l2) = tap(x), compiled(x)
        torch.testing.assert_close(f2, f1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
        g1 = torch.autograd.grad(f1.sum() + l1.sum(), x)[0]
        g2 = torch.autograd.grad(f2.sum() + l2.sum(), x)[0]
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)


def _ddp_body(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                           timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    model = nn.parallel.DistributedDataParallel(FeatureTap(mlp()))
    part = slice(4 * rank, 4 * rank + 4)
    x_adv = PGD(model.module, 0.1, 0.03, 3, generator=torch.Generator().manual_seed(rank))(x[part], y[part])
    f, logits = model(x_adv)
    (f.pow(2).mean() + nn.functional.cross_entropy(logits, y[part])).backward()
    grads = {n: p.grad for n, p in model.module.named_parameters()}
    adv = [torch.empty_like(x_adv) for _ in range(2)]
    dist.all_gather(adv, x_adv)
    if rank == 0:
        torch.save({"grads": grads, "x_adv": torch.cat(adv)}, os.path.join(out, "ddp.pt"))
    dist.barrier()


def _ddp_worker(rank: int, port: int, out: str) -> None:
    run_rank(_ddp_body, rank, port, out)


@pytest.mark.distributed
def test_ddp_two_gloo_ranks_average_one_process_gradient(tmp_path):
    """DDP(FeatureTap(model)) on 2 gloo ranks, each attacking and training on half the batch: the
    averaged gradient is one process's gradient on the whole batch of those adversarial images."""
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    g = torch.Generator().manual_seed(5)
    _, y = torch.rand(8, 1, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    tap = FeatureTap(mlp())
    f, logits = tap(got["x_adv"])
    halves = [sl for sl in (slice(0, 4), slice(4, 8))]
    loss = sum(f[h].pow(2).mean() + nn.functional.cross_entropy(logits[h], y[h]) for h in halves) / 2
    loss.backward()
    for n, p in tap.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_sits_at_the_modules_layer():
    """feature_tap.py imports torch only: never the pipeline (gacd_fast.distill) nor a backend."""
    import ast
    import gacd_fast.feature_tap as ft
    tree = ast.parse(open(ft.__file__).read())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert names <= {"__future__", "difflib", "torch"}, names
