"""What the whole-step benchmarks (bench_pgd's attacks, bench_train_step's GACD steps) run: the
models and shapes users train (ResNet-18 on CIFAR-shaped images; the small CNNs of digits and
MNIST-5k) and the ways to run them side by side in one process, with the summary that prints the
ratios issue 20 asks for.

Variants: ``plain`` (the loop as a user writes it without gacd_fast: a hand-written PGD loop, eager
InfoNCE over the gathered bank), ``torchattacks`` (its PGD, fp32), ``gacd`` (gacd_fast fp32),
``gacd`` bf16 (the attack's ``precision="bf16"`` and the step's model forwards under autocast); a
``_cl`` suffix puts the models and batches in channels_last (``plain_cl`` fp32: what the layout
alone gives a plain loop; ``gacd_cl`` fp32 and bf16: the pipeline's ``--channels-last``). A half
precision that this device runs only emulated (a CPU without AVX512-BF16/AMX) is timed with fewer
repeats and flagged. ``--variants`` picks some of them by label (``"plain fp32,gacd_cl fp32"``).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common import Recorder, peak_extra_mb, probe_in_subprocess, progress, time_interleaved

from gacd_fast import _precision
from gacd_fast.distill.models import build_model


@dataclass(frozen=True)
class Workload:
    """A model pair and its data: student/teacher architectures, image shape, the training attack."""

    name: str
    student: str
    teacher: str
    shape: tuple[int, int, int]  # C, H, W
    eps: float
    alpha: float
    num_data: int  # training-set size (the memory bank's rows)


WORKLOADS = {
    "resnet18": Workload("resnet18", "resnet18", "resnet18", (3, 32, 32), 8 / 255, 2 / 255, 50000),
    "small_cnn_digits": Workload("small_cnn_digits", "small_cnn_student", "small_cnn_teacher", (1, 8, 8), 0.2, 0.05, 1437),
    "small_cnn_mnist5k": Workload("small_cnn_mnist5k", "small_cnn_student_stride2", "small_cnn_teacher_stride2",
                                  (1, 28, 28), 0.3, 0.1, 4000),
}


@dataclass(frozen=True)
class Variant:
    """One way to run a step: who implements it, its precision, its memory format."""

    provider: str  # plain | torchattacks | gacd, with "_cl" for channels_last (plain_cl, gacd_cl)
    precision: str = "fp32"

    @property
    def channels_last(self) -> bool:
        return self.provider.endswith("_cl")

    @property
    def base(self) -> str:
        """Who runs the step, whatever the memory format: plain, torchattacks or gacd."""
        return self.provider.removesuffix("_cl")

    @property
    def dtype(self) -> str:
        """The CSV's dtype column: the precision of the model's matmuls."""
        return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.precision]

    @property
    def label(self) -> str:
        return f"{self.provider} {self.precision}"


VARIANTS = [Variant("plain"), Variant("plain_cl"), Variant("torchattacks"), Variant("gacd"), Variant("gacd_cl"),
            Variant("gacd", "bf16"), Variant("gacd_cl", "bf16")]


def add_variants_option(parser: argparse.ArgumentParser) -> None:
    labels = ",".join(v.label for v in VARIANTS)
    parser.add_argument("--variants", default=labels, type=chosen_variants,
                        help=f"comma-separated variant labels (default: all: {labels})")


def chosen_variants(labels: str) -> list[Variant]:
    """The variants named in ``labels`` (comma-separated, e.g. "plain fp32,gacd_cl fp32"), in VARIANTS' order."""
    known = {v.label: v for v in VARIANTS}
    wanted = [label.strip() for label in labels.split(",") if label.strip()]
    unknown = [label for label in wanted if label not in known]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown variants {unknown}; choose from {list(known)}")
    return [v for v in VARIANTS if v.label in wanted]


def emulated(variant: Variant, device: torch.device) -> bool:
    """Whether ``device`` runs the variant's precision only emulated (slow: fewer repeats)."""
    return not _precision.is_native(variant.precision, device)


def model(name: str, workload: Workload, variant: Variant, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """Architecture ``name`` with seeded weights (the same for every variant), in the variant's memory format."""
    torch.manual_seed(seed)
    m = build_model(name, 10, workload.shape[0]).to(device)
    return m.to(memory_format=torch.channels_last) if variant.channels_last else m


def images(workload: Workload, batch: int, variant: Variant, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded batch of images in [0, 1] (in the variant's memory format) and labels."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *workload.shape, generator=g).to(device)
    y = torch.randint(10, (batch,), generator=g).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if variant.channels_last else x), y


def warm_library(device: torch.device) -> None:
    """Load gacd_fast's backends and run each op once on tiny inputs, so that a memory probe of a
    step's first call does not count the library's one-time loads (every variant gets this)."""
    import gacd_fast

    x = torch.rand(2, 3, device=device)
    gacd_fast.pgd_step_(x.clone(), torch.randn_like(x), x, alpha=0.1, eps=0.1)
    gacd_fast.pgd_random_start(x, eps=0.1)
    q = torch.randn(2, 4, device=device, requires_grad=True)
    gacd_fast.info_nce(q, torch.randn(2, 4, device=device), torch.randn(5, 4, device=device),
                       neg_index=torch.zeros(2, 3, dtype=torch.long, device=device)).backward()


def load() -> str:
    """The 1-minute load average (other jobs on a shared machine make timings noisy)."""
    return f"{os.getloadavg()[0]:.2f}"


def time_variants(rec: Recorder, op: str, dims: dict, fns: dict[str, Callable[[], object]], variants: dict[str, Variant],
                  device: torch.device, *, reps: int, batch: int, describe: Callable[[float], str],
                  memory_spec: Callable[[Variant], dict] | None, script: Path) -> None:
    """Time the variants' ``fns`` side by side, interleaved (one call of each per round; a
    precision this device only emulates: one call), and record per variant its time (ms),
    images/s and, with ``memory_spec``, the extra peak memory of one call (on a CPU, measured by
    re-running ``script`` with ``--probe <memory_spec(variant)>`` in a fresh process). One line
    each: ``describe(p50_ms)``."""
    slow = frozenset(label for label, v in variants.items() if emulated(v, device))
    progress(f"  {op} {dims}: timing {', '.join(fns)} interleaved ({load()})")
    times = time_interleaved(fns, device, warmup=1, reps=reps, few=slow)
    for label, variant in variants.items():
        p50, p20, p80 = times[label]
        rec.add(op, variant.provider, "full", variant.dtype, dims, "time", "ms", p50, p20, p80)
        rec.add(op, variant.provider, "full", variant.dtype, dims, "images_per_s", "1/s", batch / (p50 / 1e3))
        line = f"  {op} {dims} {label}: {describe(p50)}"
        if memory_spec is not None:
            mb = (probe_in_subprocess(script, memory_spec(variant)) if device.type == "cpu"
                  else peak_extra_mb(fns[label], device, warmup=False))
            rec.add(op, variant.provider, "full", variant.dtype, dims, "peak_memory", "MB", mb)
            line += f", peak extra {mb:.0f} MB"
        progress(line + (" (emulated: one call)" if label in slow else ""))


def summary(rows: list[dict], targets: dict[str, list[tuple[str, str, str, float]]]) -> str:
    """Per op: every variant's time, images/s and peak memory, with its speed-up over plain fp32
    and over torchattacks fp32 (side by side in this run), then the targets as verdict lines.

    ``targets``: op -> [(what, variant label, baseline label, bound)]: "speedup" needs
    baseline time / variant time >= bound; "time_ratio" and "memory_ratio" need variant / baseline <= bound.
    """
    by_op: dict[str, dict[str, dict[str, float]]] = {}
    shapes: dict[str, str] = {}
    for r in rows:
        label = f"{r['provider']} {_precision_of(r['dtype'])}"
        by_op.setdefault(r["op"], {}).setdefault(label, {})[r["metric"]] = float(r["p50"])
        shapes[r["op"]] = " ".join(f"{k}={r[k]}" for k in ("B", "K") if r[k])
    lines = []
    for op, variants in by_op.items():
        lines.append(f"{op} ({shapes[op]}):")
        lines.append(f"  {'variant':<20}{'time':>12}{'images/s':>10}{'peak MB':>9}{'x plain fp32':>14}{'x torchattacks fp32':>21}")
        base = {b: variants.get(b, {}).get("time") for b in ("plain fp32", "torchattacks fp32")}
        for label, m in variants.items():
            if "time" not in m:
                continue
            ratios = "".join(f"{(base[b] / m['time'] if base[b] else float('nan')):>{w}.2f}"
                             for b, w in (("plain fp32", 14), ("torchattacks fp32", 21)))
            mem = f"{m['peak_memory']:>9.0f}" if "peak_memory" in m else f"{'-':>9}"
            lines.append(f"  {label:<20}{m['time'] / 1e3:>10.3f} s{m.get('images_per_s', float('nan')):>10.1f}{mem}{ratios}")
        for what, label, baseline, bound in targets.get(op, []):
            lines.append("  " + _verdict(variants, what, label, baseline, bound))
    return "\n".join(lines)


def _precision_of(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def _verdict(variants: dict[str, dict[str, float]], what: str, label: str, baseline: str, bound: float) -> str:
    metric = "peak_memory" if what == "memory_ratio" else "time"
    a, b = variants.get(label, {}).get(metric), variants.get(baseline, {}).get(metric)
    if a is None or b is None:
        return f"target {what} {label} vs {baseline}: not measured"
    if what == "speedup":
        value, ok, rel = b / a, b / a >= bound, ">="
        text = f"{label} is {value:.2f}x {baseline}"
    else:
        value, ok, rel = a / b, a / b <= bound, "<="
        text = f"{label} / {baseline} {'peak memory' if metric == 'peak_memory' else 'time'} = {value:.2f}"
    return f"target: {text} (needs {rel} {bound}): {'MET' if ok else 'NOT MET'}"
