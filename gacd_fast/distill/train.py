"""The training loop (tqdm progress, per-epoch resumable checkpoints), final checkpoints, logging."""
from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import _precision
from . import parallel
from .atomic import atomic_torch_save
from .config import option_defaults
from .data import ImageDataset, iterate
from .methods import Method, StepOutput
from .models import build_model
from .runs import NonFiniteLossError, RunError, read_torch_file, remove_stale_temporaries, resolve_device

# A callback of fit(), called as callback(tag, epoch) after each epoch, once that epoch's state file is
# written: e.g. progress reporting elsewhere, or stopping a run at a known point (the resume tests do).
# An exception it raises ends fit() there; with KeyboardInterrupt the CLI says to continue with --resume.
EpochEndCallback = Callable[[str, int], None]

# Config keys that may differ between an interrupted run and its --resume without changing a number.
RESUME_IGNORED_KEYS = frozenset({"resume", "progress", "threads", "out_dir", "teacher", "checkpoints"})
# The content hash of a student's teacher checkpoint, recorded in its run config: the teacher's path may
# change between a run and its --resume (it is ignored above), its content may not.
TEACHER_HASH_KEY = "teacher_sha256"
# What a state file written by _Training.save_state holds at least.
STATE_KEYS = ("epoch", "model", "method", "optimizer", "scheduler", "loader_generator", "rng", "history")


def pick_device(name: str = "auto") -> torch.device:
    """"auto": the GPU when there is one, else the CPU; a device that does not exist here (a typo,
    cuda without a GPU, meta) is a RunError naming --device."""
    return resolve_device(name)


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
    """Restore the global RNG states saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, internal, gauss_next = state["python"]
    random.setstate((v, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def config_mismatch(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """Keys (outside RESUME_IGNORED_KEYS) whose values differ between two config dicts. ``saved``
    may come from an older gacd-fast: an option it lacks is compared at its declared default
    (:func:`.config.option_defaults`, the value that keeps the behaviour from before the option),
    and not at all when that default is None (filled in from the dataset, which is compared). A
    teacher hash that ``saved`` lacks (a run from before it was recorded) is not compared."""
    if saved is None or current is None:
        return []
    keys = (set(saved) | set(current)) - RESUME_IGNORED_KEYS
    if saved.get(TEACHER_HASH_KEY) is None:
        keys.discard(TEACHER_HASH_KEY)
    defaults = option_defaults()
    diff = []
    for k in sorted(keys):
        if k not in saved and k in defaults and defaults[k] is None:
            continue
        if saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k)):
            diff.append(k)
    return diff


def check_resumable(path: str, saved: dict[str, Any] | None, current: dict[str, Any] | None) -> None:
    """RunError (a ValueError) naming the differing options unless the file ``path``, written with
    the config ``saved``, may be continued with ``current``; a different teacher (content hash) is
    said first."""
    if saved is not None and not isinstance(saved, dict):
        raise RunError(f"--resume: {path} holds no run configuration; delete it to start that model over, "
                       "or run without --resume")
    diff = config_mismatch(saved, current)
    if TEACHER_HASH_KEY in diff:
        was, now = saved.get(TEACHER_HASH_KEY), current.get(TEACHER_HASH_KEY)  # type: ignore[union-attr]
        raise RunError(f"--resume: {path} was trained with another teacher (sha256 {str(was)[:12]}...) than "
                       f"--teacher {current.get('teacher')} (sha256 {str(now)[:12]}...); pass the teacher it was "  # type: ignore[union-attr]
                       "trained with, or run without --resume to start over")
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} there, {current.get(k)!r} now" for k in diff[:6])  # type: ignore[union-attr]
        raise RunError(f"--resume: {path} was written with a different configuration ({detail}); "
                       "run without --resume to start over, or with the same options")


@dataclass(frozen=True)
class Speed:
    """How a run computes (not what): the autocast precision of training (the method's step: the
    model's forward and backward, the training attack's, the teacher's clean forward) and of the
    test accuracy, channels_last memory format, torch.compile of the trained model."""

    precision: str = "fp32"
    eval_precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def of(cls, cfg: Any) -> Speed:
        """The speed fields of a config (those it has; the rest at their defaults)."""
        return cls(**{f: getattr(cfg, f) for f in ("precision", "eval_precision", "channels_last", "compile")
                      if hasattr(cfg, f)})

    def check(self, device: torch.device) -> None:
        """ValueError naming the option when ``device`` cannot run a precision (a configuration
        error: the CLI reports it in one line); a warning when it runs it emulated."""
        for option, precision in (("--precision", self.precision), ("--eval-precision", self.eval_precision)):
            try:
                _precision.check_device(_precision.check_precision(option, precision), device, option, stacklevel=3)
            except RuntimeError as e:
                raise ValueError(str(e)) from None

    def model(self, model: nn.Module) -> nn.Module:
        """``model`` in the run's memory format (in place, returned)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """A batch [B, C, H, W] in the run's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x


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


@dataclass
class EpochTotals:
    """Sums over an epoch's samples: the loss, the correct predictions, the sample count and each
    named loss part (e.g. GACD's "ce" and "gacd"), every value weighted by its batch's size."""

    loss: float = 0.0
    correct: int = 0
    count: int = 0
    parts: dict[str, float] = field(default_factory=dict)
    last_loss: float = 0.0  # the loss of the batch added last

    def add(self, out: StepOutput, y: torch.Tensor) -> None:
        """Add one batch: ``out`` is its step's output, ``y`` [B] int64 its labels."""
        n = y.shape[0]
        self.last_loss = float(out.loss.detach())
        self.loss += self.last_loss * n
        self.correct += int((out.logits.detach().argmax(1) == y).sum())
        self.count += n
        for k, v in out.parts.items():
            self.parts[k] = self.parts.get(k, 0.0) + float(v) * n

    def over_ranks(self, device: torch.device) -> EpochTotals:
        """The sums over every rank's samples (one float64 all-reduce); the parts in sorted order."""
        keys = sorted(self.parts)
        sums = parallel.all_reduce_sum([self.loss, float(self.correct), float(self.count)]
                                       + [self.parts[k] for k in keys], device)
        return EpochTotals(sums[0], int(sums[1]), int(sums[2]), dict(zip(keys, sums[3:])))

    def mean(self, value: float) -> float:
        """``value`` per sample."""
        return value / max(1, self.count)


class _Training:
    """What one :func:`fit` call trains and saves: the model and the method on ``device``, SGD
    over their trainable parameters, the LR schedule, the data-order generator and the history.
    Its methods are fit's steps."""

    def __init__(self, model: nn.Module, method: Method, *, epochs: int, lr: float, momentum: float,
                 weight_decay: float, lr_milestones: Sequence[float], device: torch.device, seed: int, tag: str,
                 log: Callable[[str], None], speed: Speed = Speed()) -> None:
        self.ctx = parallel.current()
        self.model, self.method, self.device, self.epochs, self.tag, self.log = model, method, device, epochs, tag, log
        self.speed = speed
        speed.model(model.to(device))
        # the method steps through the compiled module (same parameters); state is saved from ``model``
        self.step_model = torch.compile(model) if speed.compile else model
        # fp16: a dynamic loss scale against gradient underflow (bf16 has float32's range and needs none)
        self.scaler = torch.amp.GradScaler(device.type) if speed.precision == "fp16" else None
        method.to(device)
        if self.ctx.enabled:  # identical start everywhere (they already are, with the same seed; made sure)
            parallel.broadcast_module(model)
            parallel.broadcast_module(method)
        self.params = [p for p in list(model.parameters()) + list(method.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        steps = sorted({max(1, round(f * epochs)) for f in lr_milestones if 0 < f < 1})
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=steps, gamma=0.1)
        self.order = torch.Generator().manual_seed(seed)  # data order
        self.history: list[dict[str, Any]] = []

    def start_fresh(self, train: ImageDataset, seed: int) -> int:
        """A new run: rank r > 0 seeds its own RNG stream (rank 0 keeps the caller's), then the
        method's preparation (e.g. GACD's bank prefill, the same rows on every rank). Returns 1,
        the first epoch to train."""
        if self.ctx.rank > 0:
            torch.manual_seed(seed + RANK_SEED_STRIDE * self.ctx.rank)
        with _precision.autocast(self.speed.precision, self.device):  # e.g. the bank from the teacher as in the steps
            self.method.prepare(train, self.device)
        return 1

    def resume(self, path: str, config: dict[str, Any] | None, seed: int) -> int:
        """Load the state file ``path`` (written by :meth:`save_state` with the same ``config``):
        weights, optimizer, schedule, data order, history and this rank's RNG streams. A rank the
        file has no stream for (more processes than when it was written) seeds a fresh one.
        Returns the first epoch still to train."""
        hint = "delete it to start this model over, or run without --resume"
        state = read_torch_file(path, "gacd-fast state file", hint, required=STATE_KEYS)
        check_resumable(path, state.get("config"), config)
        try:
            self.model.load_state_dict(state["model"])
            self.method.load_state_dict(state["method"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.order.set_state(state["loader_generator"])
            if self.scaler is not None and "grad_scaler" in state:
                self.scaler.load_state_dict(state["grad_scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunError(f"--resume: {path} does not fit this run ({first[:200]}); {hint}") from None
        rngs = state.get("rng_ranks") or [state["rng"]]
        if self.ctx.rank < len(rngs):
            set_rng_state(rngs[self.ctx.rank])
        else:
            torch.manual_seed(seed + RANK_SEED_STRIDE * self.ctx.rank)
        self.history = list(state["history"])
        done = int(state["epoch"])
        self.log(f"[{self.tag}] resuming after epoch {done}/{self.epochs} from {path}")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.ctx.world_size:
            self.log(f"[{self.tag}] note: {path} was written by {saved_world} process(es), now {self.ctx.world_size}: "
                     "the run continues, but not exactly as an uninterrupted one")
        return done + 1

    def train_epoch(self, train: ImageDataset, epoch: int, *, batch_size: int, augment: bool,
                    progress: bool) -> EpochTotals:
        """One pass over this rank's shards of ``train`` (one SGD step per batch), then the LR
        schedule's step. Returns the epoch's sums over every rank's samples."""
        self.model.train()
        self.method.train()
        totals = EpochTotals()
        n_batches = num_batches(len(train), batch_size)
        # a last batch of one sample joins the one before it: in-batch negatives (bank="batch") and
        # BatchNorm's batch statistics need two samples, and an epoch must not die at its end
        batches = bar(iterate(train, batch_size, shuffle=True, generator=self.order, augment=augment,
                              device=self.device, rank=self.ctx.rank, world_size=self.ctx.world_size, merge_tail=True),
                      total=n_batches, desc=f"{self.tag} epoch {epoch}/{self.epochs}", unit="batch", leave=False,
                      progress=progress)
        for b, (x, y, idx) in enumerate(batches, 1):
            with _precision.autocast(self.speed.precision, self.device):
                out = self.method.step(self.step_model, self.speed.images(x), y, idx)
            self.sgd_step(out.loss)
            totals.add(out, y)
            if not math.isfinite(totals.last_loss):
                batches.close()
                raise NonFiniteLossError(
                    f"[{self.tag}] epoch {epoch}, batch {b}/{n_batches}: the training loss is {totals.last_loss} "
                    f"(lr {self.optimizer.param_groups[0]['lr']:g}): training stopped, nothing of this epoch was "
                    "saved; lower --lr or check the data and options, then run again (--resume continues from the "
                    "last finished epoch)")
            batches.set_postfix(loss=f"{totals.mean(totals.loss):.3f}", acc=f"{totals.mean(totals.correct):.3f}",
                                refresh=False)
        batches.close()
        self.scheduler.step()
        return totals.over_ranks(self.device) if self.ctx.enabled else totals

    def sgd_step(self, loss: torch.Tensor) -> None:
        """Backward, gradients averaged over the ranks, the optimizer's step, then rank 0's model
        buffers everywhere (BatchNorm statistics, as DDP's broadcast_buffers)."""
        self.optimizer.zero_grad(set_to_none=True)
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if self.ctx.enabled:  # scaled gradients average like the true ones (the scale is the same everywhere)
            parallel.average_gradients(self.params)
        if self.scaler is None:
            self.optimizer.step()
        else:  # unscales, skips the step on inf/NaN gradients, adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ctx.enabled:
            parallel.broadcast_buffers(self.model)

    def record_epoch(self, epoch: int, totals: EpochTotals, test: ImageDataset | None, t0: float) -> dict[str, Any]:
        """The epoch's history row (loss, training accuracy, lr, each part's loss, test clean accuracy,
        seconds since ``t0``), appended to the history and logged; returned."""
        row = {"epoch": epoch, "loss": totals.mean(totals.loss), "train_acc": totals.mean(totals.correct),
               "lr": self.optimizer.param_groups[0]["lr"]}
        row.update({f"{k}_loss": totals.mean(v) for k, v in totals.parts.items()})
        if test is not None:
            with _precision.autocast(self.speed.eval_precision, self.device):
                row["test_acc"] = clean_accuracy(self.model, test, self.device)
        row["time_s"] = time.time() - t0
        self.history.append(row)
        test_txt = f" test-clean {row['test_acc']:.4f}" if test is not None else ""
        parts_txt = "".join(f" {k} {totals.mean(v):.4f}" for k, v in totals.parts.items())
        self.log(f"[{self.tag}] epoch {epoch:3d}/{self.epochs} loss {row['loss']:.4f}{parts_txt} "
                 f"train-acc {row['train_acc']:.4f}{test_txt} ({row['time_s']:.1f}s)")
        return row

    def save_state(self, path: str, epoch: int, config: dict[str, Any] | None) -> None:
        """Write the whole training state after ``epoch`` to ``path`` (atomically, rank 0), with
        every rank's RNG streams, so that :meth:`resume` continues exactly."""
        rngs = parallel.all_gather_object(rng_state())
        if not self.ctx.is_main:
            return
        atomic_torch_save({
            "epoch": epoch, "epochs": self.epochs, "tag": self.tag,
            "model": _cpu_state(self.model), "method": _cpu_state(self.method),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "loader_generator": self.order.get_state(), "rng": rngs[0],
            **({"grad_scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **({"rng_ranks": rngs, "world_size": self.ctx.world_size} if self.ctx.enabled else {}),
            "history": self.history, "config": config,
        }, path)


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
    lr_milestones: Sequence[float] = (0.5, 0.75),
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
    callbacks: Sequence[EpochEndCallback] = (),
    speed: Speed = Speed(),
) -> list[dict[str, Any]]:
    """SGD over the model's and the method's parameters, lr x0.1 at ``lr_milestones`` (fractions
    of ``epochs``); returns the history, one dict per epoch: loss, training accuracy (on the inputs
    the method trains on, adversarial ones for robust methods), lr (after the epoch's schedule
    step), each loss part, test clean accuracy, seconds.

    ``state_path``: after every epoch the whole training state (model, method incl. GACD's memory
    bank buffers, optimizer, LR scheduler, data-order generator, torch/numpy/python RNG states,
    epoch, history, ``config``) is written there atomically. ``resume``: start from that file when
    it exists (its config must match ``config``), so that the run ends exactly as an uninterrupted one.
    ``callbacks``: each called as ``callback(tag, epoch)`` after every epoch, once its state file is
    written (see :data:`EpochEndCallback`). ``speed``: precision, memory format and compilation
    (:class:`Speed`; checked against ``device`` first).

    Under torch.distributed (see :mod:`.parallel`): ``batch_size`` is the global batch, each rank
    trains on its part; the parameters start from rank 0's, the gradients are averaged over the
    ranks after backward and the model's buffers broadcast from rank 0 after each step (as DDP);
    each rank has its own RNG stream (all saved in the state file); rank 0 alone logs (the epoch's
    loss and accuracy summed over the ranks), shows progress and writes the state file.
    """
    for i, cb in enumerate(callbacks):
        if not callable(cb):
            raise TypeError(f"callbacks[{i}] must be callable as callback(tag, epoch), got {type(cb).__name__}")
    speed.check(device)
    run = _Training(model, method, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                    lr_milestones=lr_milestones, device=device, seed=seed, tag=tag, log=log, speed=speed)
    if state_path and run.ctx.is_main:  # what a killed save of this state file left behind
        remove_stale_temporaries(os.path.dirname(os.path.abspath(state_path)), state_path)
    if resume and state_path and os.path.isfile(state_path):
        start = run.resume(state_path, config, seed)
    else:
        start = run.start_fresh(train, seed)
    if run.ctx.enabled:
        log(f"[{tag}] torch.distributed: {run.ctx.world_size} processes ({torch.distributed.get_backend()}), global "
            f"batch {batch_size} split over them, gradients averaged")
    progress = progress and run.ctx.is_main
    epoch_bar = bar(total=epochs, initial=start - 1, desc=tag or "train", unit="epoch", progress=progress)
    with deterministic_algorithms(deterministic), epoch_bar:
        for epoch in range(start, epochs + 1):
            t0 = time.time()
            totals = run.train_epoch(train, epoch, batch_size=batch_size, augment=augment, progress=progress)
            row = run.record_epoch(epoch, totals, test, t0)
            epoch_bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_acc']:.3f}", refresh=False)
            epoch_bar.update(1)
            if state_path:
                run.save_state(state_path, epoch, config)
            for callback in callbacks:
                callback(tag, epoch)
    model.eval()
    return run.history


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def num_batches(n: int, batch_size: int) -> int:
    """Batches of an epoch over ``n`` samples (a last batch of one sample joins the one before it)."""
    full = (n + batch_size - 1) // batch_size
    return full - 1 if full > 1 and n % batch_size == 1 else full


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
    hint = "pass a model checkpoint written by `gacd-fast train-teacher` or `gacd-fast distill`"
    ckpt = read_torch_file(path, "gacd-fast model checkpoint", hint,
                           required=("arch", "num_classes", "in_channels", "state_dict"))
    try:
        model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_channels"])
        model.load_state_dict(ckpt["state_dict"])
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise RunError(f"{path} is not a gacd-fast model checkpoint ({type(e).__name__}: {first}); {hint}") from None
    bad = [k for k, v in ckpt["state_dict"].items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise RunError(f"{path} holds NaN/inf weights ({bad[0]}{' and others' if len(bad) > 1 else ''}): its training "
                       "diverged; train it again (e.g. with a lower --lr)")
    model.to(device).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
