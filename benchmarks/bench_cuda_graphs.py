"""PGD-10 on a GPU with the launch overhead removed: one PGD step (forward, backward, pgd_step_)
captured in a CUDA graph with static shapes and replayed, and the same step under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs through inductor), against gacd_fast.PGD in
eager mode, in fp32 and bf16, side by side in one run; the graphed images are checked against the
eager ones from the same start. Needs a CUDA GPU (an owed check of ``make gpu-check``: no GPU has
been lent to this project yet); without one it says so and exits 0.

    python benchmarks/bench_cuda_graphs.py [--quick]
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import gacd_fast  # noqa: E402
from bench_pgd import LogitsOnly  # noqa: E402
from common import Recorder, base_parser, peak_extra_mb, progress, time_ms  # noqa: E402
from gacd_fast import _precision  # noqa: E402
from workloads import WORKLOADS, Variant, images, model  # noqa: E402

STEPS = 10
WORKLOAD = WORKLOADS["resnet18"]


class StaticPGD:
    """PGD-``steps`` whose one step runs as a replayed CUDA graph over static buffers: ``adv``
    (updated in place), ``nat`` and ``y``. The start is drawn eagerly (from ``generator``)."""

    def __init__(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str,
                 mode: str = "graph") -> None:
        self.net, self.precision, self.device = net.eval(), precision, x.device
        self.adv, self.nat, self.y = x.clone(), x.clone(), y.clone()
        if mode == "graph":
            self._capture()
        else:  # reduce-overhead: inductor records and replays the graphs itself
            self.replay = torch.compile(self._step, mode="reduce-overhead")

    def _step(self) -> None:
        adv = self.adv.detach().requires_grad_(True)
        with _precision.autocast(self.precision, self.device):
            out = self.net(adv)
        (grad,) = torch.autograd.grad(F.cross_entropy(out.float(), self.y), adv)
        gacd_fast.pgd_step_(self.adv, grad, self.nat, alpha=WORKLOAD.alpha, eps=WORKLOAD.eps)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuDNN/cuBLAS handles, autotuning)
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.replay = self.graph.replay

    def __call__(self, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        self.nat.copy_(x)
        self.y.copy_(y)
        self.adv.copy_(x if start is None else start)
        for _ in range(STEPS):
            self.replay()
        return self.adv.clone()


def variant_fn(kind: str, precision: str, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    net = LogitsOnly(model(WORKLOAD.student, WORKLOAD, Variant("gacd", precision), x.device))
    if kind == "eager":
        atk = gacd_fast.PGD(net, eps=WORKLOAD.eps, alpha=WORKLOAD.alpha, steps=STEPS, random_start=False,
                            precision=precision)
        return lambda: atk(x, y)
    static = StaticPGD(net, x, y, precision, mode=kind)
    return lambda: static(x, y)


def main() -> int:
    ap = base_parser(__doc__.splitlines()[0])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"bench_cuda_graphs: skipped: needs a CUDA GPU (device {device}); an owed check of make gpu-check")
        return 0
    rec = Recorder("bench_cuda_graphs", device)
    reps = args.reps or 20
    for batch in ([32, 128] if args.quick else [32, 128, 512]):
        x, y = images(WORKLOAD, batch, Variant("gacd"), device)
        for precision in ("fp32", "bf16"):
            reason = _precision.unsupported_reason(precision, device)
            if reason:
                rec.skip(f"{precision}", reason)
                continue
            eager = variant_fn("eager", precision, x, y)()
            dtype = Variant("gacd", precision).dtype
            for kind in ("eager", "graph", "reduce-overhead"):
                fn = variant_fn(kind, precision, x, y)
                got = fn()
                diff = float((got - eager).abs().max())  # same start (the clean images), same model
                p50, p20, p80 = time_ms(fn, device, warmup=2, reps=reps)
                shape = {"B": batch}
                rec.add("pgd10_resnet18", f"gacd_{kind}", "full", dtype, shape, "time", "ms", p50, p20, p80)
                rec.add("pgd10_resnet18", f"gacd_{kind}", "full", dtype, shape, "max_diff_vs_eager", "1", diff)
                if not args.no_memory:
                    rec.add("pgd10_resnet18", f"gacd_{kind}", "full", dtype, shape, "peak_memory", "MB",
                            peak_extra_mb(fn, device))
                progress(f"  PGD-10 resnet18 B={batch} {precision} {kind}: {p50:.2f} ms, max |diff| vs eager {diff:.3g}")
    rec.write(args.out)
    print(rec.summary(baselines=("gacd_eager",)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
