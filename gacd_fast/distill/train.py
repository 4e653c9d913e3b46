"""The training loop (tqdm progress, per-epoch resumable checkpoints), final checkpoints, logging."""
from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import parallel
from .atomic import atomic_torch_save
from .data import ImageDataset, iterate
from .methods import Method
from .models import build_model

# Called as hook(tag, epoch) after each epoch's state checkpoint is on disk (tests use it to
# interrupt a run at a known point).
EPOCH_END_HOOKS: list[Callable[[str, int], None]] = []

# Config keys that may differ between an interrupted run and its --resume without changing a number.
RESUME_IGNORED_KEYS = frozenset({"resume", "progress", "threads", "out_dir", "teacher", "checkpoints"})


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Logger:
    """Prints progress lines (through tqdm, so that open bars stay intact) and appends them to
    ``<out_dir>/log.txt``."""

    def __init__(self, out_dir: str | None = None, quiet: bool = False) -> None:
        self.path = os.path.join(out_dir, "log.txt") if out_dir else None
        self.quiet = quiet
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            tqdm.write(msg, file=sys.stdout)
            sys.stdout.flush()
        if self.path:
            with open(self.path, "a") as f:
                f.write(msg + "\n")


def bar(iterable: Any = None, *, progress: bool = True, **kw: Any) -> tqdm:
    """A tqdm bar on stderr (disabled when ``progress`` is False)."""
    return tqdm(iterable, disable=not progress, dynamic_ncols=True, file=sys.stderr, **kw)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """torch.use_deterministic_algorithms(warn_only) and no cuDNN autotuning inside the block;
    the previous settings come back after it."""
    if not enabled:
        yield
        return
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark = prev[2]


def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and python, in tensors and plain values
    (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, gauss_next = state["python"]
    random.setstate((v, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_mismatch(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """Keys (outside RESUME_IGNORED_KEYS) whose values differ between two config dicts."""
    if saved is None or current is None:
        return []
    keys = (set(saved) | set(current)) - RESUME_IGNORED_KEYS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def check_resumable(path: str, saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    diff = config_mismatch(saved, current)
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in diff[:6])  # type: ignore[union-attr]
        raise ValueError(f"--resume: {path} was written with a different configuration ({detail}); "
                         "run without --resume to start over, or with the same options")


@torch.no_grad()
def clean_accuracy(model: nn.Module, data: ImageDataset, device: torch.device, batch_size: int = 256) -> float:
    """Test accuracy; under torch.distributed each rank scores every world_size-th sample and the
    counts are summed (the models are identical on every rank)."""
    was = model.training
    model.eval()
    ctx = parallel.current()
    mine = torch.arange(ctx.rank, len(data), ctx.world_size)
    correct = 0
    for start in range(0, mine.numel(), batch_size):
        idx = mine[start:start + batch_size]
        x, y = data.batch(idx).to(device), data.labels[idx].to(device)
        correct += int((model(x)[1].argmax(1) == y).sum())
    model.train(was)
    if ctx.enabled:
        correct = int(parallel.all_reduce_sum([float(correct)], device)[0])
    return correct / max(1, len(data))


# Seed offset of rank r's RNG streams (attacks' random starts, GACD's negatives) under torch.distributed:
# the ranks must not draw the same numbers for their different samples.
RANK_SEED_STRIDE = 1_000_003


def fit(
    model: nn.Module,
    method: Method,
    train: ImageDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    lr_milestones: tuple[float, ...] | list[float] = (0.5, 0.75),
    augment: bool = False,
    device: torch.device,
    seed: int = 0,
    test: ImageDataset | None = None,
    log: Callable[[str], None] = print,
    tag: str = "",
    progress: bool = False,
    state_path: str | None = None,
    resume: bool = False,
    config: dict[str, Any] | None = None,
    deterministic: bool = True,
) -> list[dict[str, Any]]:
    """SGD over the model's and the method's parameters, lr x0.1 at ``lr_milestones`` (fractions
    of ``epochs``); returns the history, one dict per epoch: loss, training accuracy (on the inputs
    the method trains on, adversarial ones for robust methods), lr, test clean accuracy, seconds.

    ``state_path``: after every epoch the whole training state (model, method incl. GACD's memory
    bank buffers, optimizer, LR scheduler, data-order generator, torch/numpy/python RNG states,
    epoch, history, ``config``) is written there atomically. ``resume``: start from that file when
    it exists (its config must match ``config``), so that the run ends exactly as an uninterrupted one.

    Under torch.distributed (see :mod:`.parallel`): ``batch_size`` is the global batch, each rank
    trains on its part; the parameters start from rank 0's, the gradients are averaged over the
    ranks after backward and the model's buffers broadcast from rank 0 after each step (as DDP);
    each rank has its own RNG stream (all saved in the state file); rank 0 alone logs (the epoch's
    loss and accuracy summed over the ranks), shows progress and writes the state file.
    """
    ctx = parallel.current()
    progress = progress and ctx.is_main
    model.to(device)
    method.to(device)
    if ctx.enabled:  # identical start everywhere (they already are, with the same seed; made sure)
        parallel.broadcast_module(model)
        parallel.broadcast_module(method)
    params = [p for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps = sorted({max(1, round(f * epochs)) for f in lr_milestones if 0 < f < 1})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=steps, gamma=0.1)
    gen = torch.Generator().manual_seed(seed)  # data order
    history: list[dict[str, Any]] = []
    start = 1
    if resume and state_path and os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        check_resumable(state_path, state.get("config"), config)
        model.load_state_dict(state["model"])
        method.load_state_dict(state["method"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["loader_generator"])
        saved_world = int(state.get("world_size", 1))
        rngs = state.get("rng_ranks") or [state["rng"]]
        if ctx.rank < len(rngs):
            set_rng_state(rngs[ctx.rank])
        else:
            torch.manual_seed(seed + RANK_SEED_STRIDE * ctx.rank)
        history = list(state["history"])
        start = int(state["epoch"]) + 1
        log(f"[{tag}] resuming after epoch {start - 1}/{epochs} from {state_path}")
        if saved_world != ctx.world_size:
            log(f"[{tag}] note: {state_path} was written by {saved_world} process(es), now {ctx.world_size}: "
                "the run continues, but not exactly as an uninterrupted one")
    elif ctx.rank > 0:
        torch.manual_seed(seed + RANK_SEED_STRIDE * ctx.rank)
    if start == 1:
        method.prepare(train, device)  # e.g. GACD's bank prefill (every rank the same rows); a resumed run has its state
    n_batches = (len(train) + batch_size - 1) // batch_size
    if ctx.enabled:
        log(f"[{tag}] torch.distributed: {ctx.world_size} processes ({torch.distributed.get_backend()}), global batch "
            f"{batch_size} split over them, gradients averaged")
    epoch_bar = bar(total=epochs, initial=start - 1, desc=tag or "train", unit="epoch", progress=progress)
    with deterministic_algorithms(deterministic), epoch_bar:
        for epoch in range(start, epochs + 1):
            model.train()
            method.train()
            t0 = time.time()
            total, correct, loss_sum = 0, 0, 0.0
            parts_sum: dict[str, float] = {}
            batches = bar(iterate(train, batch_size, shuffle=True, generator=gen, augment=augment, device=device,
                                  rank=ctx.rank, world_size=ctx.world_size),
                          total=n_batches, desc=f"{tag} epoch {epoch}/{epochs}", unit="batch", leave=False,
                          progress=progress)
            for x, y, idx in batches:
                out = method.step(model, x, y, idx)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                if ctx.enabled:
                    parallel.average_gradients(params)
                opt.step()
                if ctx.enabled:
                    parallel.broadcast_buffers(model)  # BatchNorm statistics: rank 0's, as DDP's broadcast_buffers
                loss_sum += float(out.loss.detach()) * y.shape[0]
                correct += int((out.logits.detach().argmax(1) == y).sum())
                total += y.shape[0]
                for k, v in out.parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + float(v) * y.shape[0]
                batches.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}", refresh=False)
            batches.close()
            sched.step()
            if ctx.enabled:  # the epoch's numbers over every rank's samples
                keys = sorted(parts_sum)
                sums = parallel.all_reduce_sum([loss_sum, float(correct), float(total)] + [parts_sum[k] for k in keys], device)
                loss_sum, correct, total = sums[0], int(sums[1]), int(sums[2])
                parts_sum = dict(zip(keys, sums[3:]))
            row = {"epoch": epoch, "loss": loss_sum / max(1, total), "train_acc": correct / max(1, total),
                   "lr": opt.param_groups[0]["lr"]}
            row.update({f"{k}_loss": v / max(1, total) for k, v in parts_sum.items()})  # e.g. GACD's ce and gacd terms
            if test is not None:
                row["test_acc"] = clean_accuracy(model, test, device)
            row["time_s"] = time.time() - t0
            history.append(row)
            test_txt = f" test-clean {row['test_acc']:.4f}" if test is not None else ""
            parts_txt = "".join(f" {k} {v / max(1, total):.4f}" for k, v in parts_sum.items())
            log(f"[{tag}] epoch {epoch:3d}/{epochs} loss {row['loss']:.4f}{parts_txt} train-acc {row['train_acc']:.4f}{test_txt} "
                f"({row['time_s']:.1f}s)")
            epoch_bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.3f}", refresh=False)
            epoch_bar.update(1)
            if state_path:
                rngs = parallel.all_gather_object(rng_state())  # every rank's RNG streams, for an exact --resume
                if ctx.is_main:
                    atomic_torch_save({
                        "epoch": epoch, "epochs": epochs, "tag": tag,
                        "model": _cpu_state(model), "method": _cpu_state(method),
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "loader_generator": gen.get_state(), "rng": rngs[0],
                        **({"rng_ranks": rngs, "world_size": ctx.world_size} if ctx.enabled else {}),
                        "history": history, "config": config,
                    }, state_path)
            for hook in list(EPOCH_END_HOOKS):
                hook(tag, epoch)
    model.eval()
    return history


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train_seconds(history: list[dict[str, Any]]) -> float:
    """Training wall time: the sum of the epochs' times (over every session of a resumed run)."""
    return float(sum(r.get("time_s", 0.0) for r in history))


def save_checkpoint(path: str, model: nn.Module, *, arch: str, num_classes: int, in_channels: int,
                    role: str, method: str, config: dict[str, Any], history: list[dict[str, Any]] | None = None) -> None:
    """Everything :func:`load_checkpoint` needs to rebuild the model, plus the run's config, its
    history and its training time ("seconds"); written atomically."""
    history = history or []
    atomic_torch_save({
        "arch": arch, "num_classes": num_classes, "in_channels": in_channels, "role": role, "method": method,
        "state_dict": _cpu_state(model),
        "config": config, "history": history, "seconds": train_seconds(history),
    }, path)


def load_checkpoint(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode on ``device``, the checkpoint's metadata)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (write one with `gacd-fast train-teacher` or `gacd-fast distill`)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        raise ValueError(f"{path} is not a gacd-fast model checkpoint ({type(e).__name__}: {e})") from None
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
