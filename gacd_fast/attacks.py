"""Attacks with torchattacks' interface: ``atk = PGD(model, eps, alpha, steps); x_adv = atk(x, y)``.

:class:`Attack` owns what every attack shares: the model and its train/eval policy (every module's
flag restored after the call, also after an exception), the checks on images and targets, the
random start, the loss, and torchattacks' targeted modes. A subclass implements only the attack
itself, :meth:`Attack._perturb` (PGD's loop, FGSM's single step), each step through
:func:`gacd_fast.functional.pgd_step_`, so it runs on the fastest backend available.

Inputs are images in [0, 1]; the result is detached; gradients are taken with
``torch.autograd.grad`` so no parameter ``.grad`` is touched. While an attack runs, the model's
parameters do not require grad (every flag restored after the call, also after an exception):
autograd then records only the input's path. It is not a speed-up: ``torch.autograd.grad`` already
skips the weights' gradients, and a paired re-measurement on a ResNet-18 CPU step found no
difference (docs/mixed_precision.md); the images are torchattacks' to the bit either way.

Precision (``precision=``, every attack): "fp32" (default) adds no autocast region, so the attack
is torchattacks' to the bit; "bf16" / "fp16" run the model's forward and backward under
``torch.autocast`` with that dtype, and compute the loss outside it: "ce" in float32 from the
logits, a custom ``loss`` on the outputs as the model produced them (e.g. bf16 features; GACDLoss
takes them). The gradient, the step, the projection and the returned images stay in the images'
dtype. Under fp16 (``precision="fp16"``, or "fp32" inside an enclosing fp16 autocast region,
e.g. a training step's) the loss is multiplied by :data:`FP16_LOSS_SCALE` (a power of two: exact)
before the backward so that small gradients do not flush to zero, and the gradient divided back.
A precision the device cannot run is a RuntimeError at the call (see :mod:`gacd_fast._precision`).

Targeted mode (``set_mode_targeted_by_label()``, ``..._by_function(fn)``, ``..._random()``,
``..._least_likely(kth_min)``; ``set_mode_default()`` goes back), as torchattacks: the attack
descends ``loss(model_output, target_labels)`` towards the target labels, i.e. it steps along the
gradient of ``-loss``. A custom ``loss`` callable therefore receives the target labels in place of
the call's ``targets`` and is minimised; a loss that ignores its targets (GACD's guided objective)
is then simply minimised, which is the opposite of attacking it: keep such attacks in the default
mode (the pipeline does).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _precision
from . import functional as gf
from ._checks import (
    check_backend_name, check_index_range, check_int, check_option, check_per_sample, check_real, check_tensor,
    reads_values,
)

LossFn = Callable[[object, torch.Tensor], torch.Tensor]
TargetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODEL_MODES = ("eval", "train", "keep")
DEFAULT_MODE = "default"
# torchattacks' names for its targeted modes (Attack.attack_mode)
BY_LABEL, BY_FUNCTION, RANDOM, LEAST_LIKELY = (
    "targeted(label)", "targeted(custom)", "targeted(random)", "targeted(least-likely)")
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# fp16 attacks: the loss is multiplied by this before the backward (fp16 gradients of a mean loss
# underflow: 1/B times a softmax residual is often below fp16's 6e-5) and the gradient divided by it
FP16_LOSS_SCALE = 1024.0


def logits_of(output: object, needed_by: str = "loss='ce'") -> torch.Tensor:
    """The logits of a model output: the output itself, or the last item of a (features, logits)
    tuple. ``needed_by`` names what asked for them, in the error for other outputs."""
    if isinstance(output, (tuple, list)):
        output = output[-1]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise TypeError(
            f"{needed_by} needs the model to return [B, C] logits or a (features, logits) tuple; "
            "pass loss=callable(model_output, targets) for other outputs"
        )
    return output


def cross_entropy(output: object, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's logits (torchattacks' PGD loss). targets: [B] class
    indices of any integer dtype (used as int64), or [B, C] floating class probabilities."""
    if not targets.is_floating_point():
        targets = targets.long()
    return F.cross_entropy(logits_of(output).float(), targets)  # float32 also for low-precision logits


def _check_targets(targets: object, batch: int, name: str = "targets") -> None:
    """[batch, ...] integer class indices or floating probabilities (what a loss may take)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() == 0 or targets.shape[0] != batch:
        raise ValueError(f"{name} must be a tensor with {batch} rows like images, got {tuple(targets.shape)}")
    if targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"{name} must hold integer class indices or float probabilities, got {targets.dtype}")


def _check_class_indices(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """[B] integer class indices in [0, num_classes) (the range is a value check)."""
    check_tensor(name, labels, ndim=1, dtypes=INTEGER_DTYPES)
    check_index_range(name, labels, num_classes, f"classes of the model's {num_classes} logits")


@contextmanager
def input_gradient_only(model: nn.Module) -> Iterator[None]:
    """The model's parameters do not require grad inside the block; their flags come back after."""
    trained = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trained:
            p.requires_grad_(False)
        yield
    finally:
        for p in trained:
            p.requires_grad_(True)


@contextmanager
def model_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Put ``model`` in eval/train mode ("keep": leave it) and restore every module's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if mode != "keep":
            model.train(mode == "train")
        yield
    finally:
        for m, was_training in flags:
            m.training = was_training


class Attack(ABC):
    """The shared part of every attack; subclasses implement :meth:`_perturb`.

    Args:
        model: maps images [B, C, H, W] (after ``normalization``) to logits, a (features,
            logits) tuple, or whatever ``loss`` understands.
        eps: radius: a Python float or per-sample [B] tensor, >= 0.
        random_start: start from :func:`gacd_fast.functional.pgd_random_start` (else from the
            clean images).
        norm: "linf" or "l2".
        loss: "ce" (mean cross-entropy, as torchattacks) or ``callable(model_output, targets)``
            returning a scalar to maximise (e.g. the GACD contrastive objective); see the module
            docstring for what it means in targeted mode.
        model_mode: "eval" (default, as torchattacks), "train" or "keep".
        normalization: (mean, std) per channel applied inside the attack, or None.
        generator: torch.Generator for the random start and random target labels (reproducible
            attacks); None: the global RNG, as torchattacks.
        backend: backend for the steps and the start: None (the current selection), "auto" or a
            registered name (checked here, as GACDLoss checks its own).
        precision: "fp32" (default), "bf16" or "fp16": the autocast dtype of the model's forward
            and backward (see the module docstring).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor,
        *,
        random_start: bool = False,
        norm: str = "linf",
        loss: str | LossFn = "ce",
        model_mode: str = "eval",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        generator: torch.Generator | None = None,
        backend: str | None = None,
        precision: str = "fp32",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        if not isinstance(eps, torch.Tensor):
            check_real("eps", eps, nonneg=True)
        self.eps = eps
        self.random_start = bool(random_start)
        self.norm = check_option("norm", norm, gf.NORMS)
        if isinstance(loss, str):
            check_option("loss", loss, ("ce",))
            self.loss_fn: LossFn = cross_entropy
        elif callable(loss):
            self.loss_fn = loss
        else:
            raise TypeError(f"loss must be 'ce' or a callable(model_output, targets), got {type(loss).__name__}")
        self.model_mode = check_option("model_mode", model_mode, MODEL_MODES)
        self.precision = _precision.check_precision("precision", precision)
        self.normalization = self._check_normalization(normalization)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.backend = check_backend_name(backend)
        self._unchecked_labels: torch.Tensor | None = None
        self.set_mode_default()

    # ------------------------------------------------------------------ targeted mode (torchattacks')
    @property
    def attack_mode(self) -> str:
        """The mode: "default", or torchattacks' name of the targeted one (e.g. "targeted(random)")."""
        return self._mode

    @property
    def targeted(self) -> bool:
        """Whether the attack descends the loss towards target labels."""
        return self._mode != DEFAULT_MODE

    def set_mode_default(self) -> Attack:
        """Untargeted: ascend the loss of the call's targets (the true labels). Returns self."""
        return self._set_mode(DEFAULT_MODE)

    def set_mode_targeted_by_label(self) -> Attack:
        """Targeted: the call's ``targets`` are the target labels. Returns self."""
        return self._set_mode(BY_LABEL)

    def set_mode_targeted_by_function(self, target_map_function: TargetFn) -> Attack:
        """Targeted: target labels = ``target_map_function(images, targets)`` (clean images
        [B, ...] in [0, 1], the call's targets), e.g. ``lambda x, y: (y + 1) % 10``; it must
        return a [B] tensor of class indices (or [B, C] probabilities for a loss that takes
        them). Returns self."""
        if not callable(target_map_function):
            raise TypeError(f"target_map_function must be callable(images, targets), got "
                            f"{type(target_map_function).__name__}")
        return self._set_mode(BY_FUNCTION, target_fn=target_map_function)

    def set_mode_targeted_random(self) -> Attack:
        """Targeted: per sample a uniformly random class other than its target (true) label,
        drawn from ``generator`` (torchattacks' draw). Needs logits from the model. Returns self."""
        return self._set_mode(RANDOM)

    def set_mode_targeted_least_likely(self, kth_min: int = 1) -> Attack:
        """Targeted: per sample the class with the ``kth_min``-th smallest clean logit among the
        classes other than its target (true) label; 1 <= kth_min <= C - 1 (checked at the call,
        when C is known). Needs logits from the model. Returns self."""
        return self._set_mode(LEAST_LIKELY, kth_min=check_int("kth_min", kth_min, minimum=1))

    def _set_mode(self, mode: str, target_fn: TargetFn | None = None, kth_min: int | None = None) -> Attack:
        self._mode, self._target_fn, self._kth_min = mode, target_fn, kth_min
        return self

    def _clean_logits(self, x_nat: torch.Tensor) -> torch.Tensor:
        """The model's logits [B, C] of the clean images, in eval mode without grad (how
        torchattacks picks its targets, whatever the attack's model mode)."""
        with torch.no_grad(), model_mode(self.model, "eval"):
            return logits_of(self._forward(x_nat), needed_by=f"attack mode {self._mode!r}").float()

    def _attack_labels(self, x_nat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The labels the loss sees: the call's ``targets`` (default mode) or the target labels."""
        if self._mode == DEFAULT_MODE:
            return targets
        if self._mode in (RANDOM, LEAST_LIKELY):
            logits = self._clean_logits(x_nat)
            num_classes = logits.shape[1]
            if num_classes < 2:
                raise ValueError(f"attack mode {self._mode!r} needs at least 2 classes, the model has {num_classes}")
            _check_class_indices("targets", targets, num_classes)
            if self._mode == RANDOM:
                return self._random_labels(targets, num_classes)
            return self._least_likely_labels(logits, targets)
        if self._mode == BY_LABEL:
            labels = targets
        else:
            labels = self._target_fn(x_nat, targets)
            _check_targets(labels, x_nat.shape[0], name="target labels from target_map_function")
        if self.loss_fn is cross_entropy and not labels.is_floating_point() and reads_values(labels):
            # one no-grad forward per call, so that a bad target label is a clear IndexError
            # rather than a device-side assertion in the CUDA cross-entropy
            _check_class_indices("target labels", labels, self._clean_logits(x_nat).shape[1])
        return labels

    def _random_labels(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[B] int64: the floor((C-1) u_i)-th class other than targets[i], u_i ~ U[0, 1) drawn in
        sample order from ``generator`` (else the global CPU RNG), which is torchattacks' draw."""
        g = self.generator
        u = torch.rand(targets.shape[0], generator=g, device=g.device if g is not None else "cpu")
        # the clamp only guards (C-1) u rounding up to C-1, where torchattacks would index past its list
        k = ((num_classes - 1) * u).long().clamp_(max=num_classes - 2).to(targets.device)
        return k + (k >= targets).long()

    def _least_likely_labels(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B] int64: the class of the kth_min-th smallest logit once the true class is excluded."""
        num_classes = logits.shape[1]
        if self._kth_min > num_classes - 1:
            raise ValueError(f"kth_min must be <= {num_classes - 1} (the classes other than the true one), "
                             f"got {self._kth_min}")
        others = logits.masked_fill(F.one_hot(targets.long(), num_classes).bool(), float("inf"))
        return others.kthvalue(self._kth_min, dim=1).indices

    # ------------------------------------------------------------------------------ the call
    @staticmethod
    def _check_normalization(norm):
        if norm is None:
            return None
        if not isinstance(norm, (tuple, list)) or len(norm) != 2:
            raise ValueError(f"normalization must be (mean, std) or None, got {norm!r}")
        mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in norm)
        if mean.shape != std.shape:
            raise ValueError(f"normalization mean and std must have the same length, got {tuple(mean.shape)} "
                             f"and {tuple(std.shape)}")
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(std).all())):
            raise ValueError(f"normalization mean and std must be finite, got mean {mean.tolist()}, std {std.tolist()}")
        if bool((std <= 0).any()):
            raise ValueError(f"normalization std must be > 0, got {std.tolist()}")
        return mean, std

    def _check_images(self, images: torch.Tensor) -> None:
        check_tensor("images", images, min_ndim=2)
        if images.numel() == 0:
            raise ValueError(f"images must hold at least one image with at least one pixel, got shape {tuple(images.shape)}")
        if self.normalization is not None:
            channels = self.normalization[0].numel()  # one value applies to every channel
            if channels != 1 and (images.dim() < 3 or images.shape[1] != channels):
                raise ValueError(f"normalization has {channels} channels but images [B, C, ...] have shape "
                                 f"{tuple(images.shape)}")
        if reads_values(images):
            if bool(torch.isnan(images).any()):
                raise ValueError("images must not contain NaN")
            lo, hi = float(images.min()), float(images.max())
            if lo < 0 or hi > 1:
                raise ValueError(
                    f"images must lie in [0, 1] (undo normalisation, pass normalization=(mean, std)), "
                    f"got values in [{lo}, {hi}]"
                )

    def _forward(self, x: torch.Tensor) -> object:
        if self.normalization is not None:
            mean, std = (v.to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2))) for v in self.normalization)
            x = (x - mean) / std
        with _precision.autocast(self.precision, x.device):  # the model's region; the loss stays outside it
            return self.model(x)

    def _gradient(self, x_adv: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The direction that attacks, for one step at x_adv [B, ...] (not requiring grad): d loss /
        d x_adv, or d(-loss) / d x_adv in targeted mode; a tensor like x_adv. The loss must be a
        scalar tensor that depends on x_adv."""
        x = x_adv.detach().requires_grad_(True)
        scale = self._loss_scale(x.device)
        with torch.enable_grad():
            output = self._forward(x)
            if self._unchecked_labels is not None:  # once per call, on the first step's logits
                self._unchecked_labels = None
                _check_class_indices("targets", labels, logits_of(output).shape[1])
            cost = self.loss_fn(output, labels)
            if not isinstance(cost, torch.Tensor) or cost.numel() != 1:
                got = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
                raise TypeError(f"loss must return a scalar tensor (one element), got {got}")
            if not cost.requires_grad:
                raise ValueError("loss must depend on the model's output (its result does not require grad)")
            cost = cost.reshape(())
            if scale != 1.0:
                cost = cost * scale
            (grad,) = torch.autograd.grad(-cost if self.targeted else cost, x)
        return grad if scale == 1.0 else grad / scale

    def _loss_scale(self, device: torch.device) -> float:
        """FP16_LOSS_SCALE when the model runs in fp16 (this attack's precision, or an enclosing
        fp16 autocast region when the attack adds none), else 1."""
        dtype = _precision.autocast_dtype(self.precision) or _precision.enclosing_dtype(device)
        return FP16_LOSS_SCALE if dtype == torch.float16 else 1.0

    @abstractmethod
    def _perturb(self, x_nat: torch.Tensor, x_adv: torch.Tensor, labels: torch.Tensor,
                 eps: float | torch.Tensor) -> torch.Tensor:
        """The attack itself, run in the attack's model mode: move ``x_adv`` (the start, a fresh
        tensor the attack may update in place) within ``eps`` of the clean ``x_nat`` (both
        [B, ...]) along :meth:`_gradient`; return the adversarial images."""

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Adversarial images [B, ...] in [0, 1], detached, same dtype as ``images``."""
        return self.forward(images, targets)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """images: [B, ...] floating, in [0, 1]; targets: [B] integer class indices (any integer
        dtype) or [B, C] floating probabilities, the true labels (the target labels in the
        ``targeted(label)`` mode). Returns adversarial images like ``images``, detached."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{type(self).__name__} needs autograd for the input gradient: call it outside "
                               "torch.inference_mode() (torch.no_grad() is fine)")
        self._check_images(images)
        _check_targets(targets, images.shape[0])
        if self.precision != "fp32":
            _precision.check_device(self.precision, images.device, type(self).__name__, stacklevel=3)
        eps = check_per_sample("eps", self.eps, images.shape[0], images.device, nonneg=True)
        # a clone of an inference tensor (made under inference_mode) is a normal tensor autograd accepts
        x_nat = images.clone() if images.is_inference() else images.detach()
        with model_mode(self.model, self.model_mode), input_gradient_only(self.model):
            # targets before the start: torchattacks' order of draws from the global RNG
            labels = self._attack_labels(x_nat, targets)
            # untargeted CE on class indices: their range is checked against the logits of the first
            # step (a label out of range would be a device-side assertion in the CUDA cross-entropy,
            # and -100 its silently ignored index)
            self._unchecked_labels = labels if (
                self._mode == DEFAULT_MODE and self.loss_fn is cross_entropy and not labels.is_floating_point()
                and reads_values(labels)) else None
            if self.random_start:
                x_adv = gf.pgd_random_start(x_nat, eps=eps, norm=self.norm, generator=self.generator,
                                            backend=self.backend)
            else:
                x_adv = x_nat.clone()
            return self._perturb(x_nat, x_adv, labels, eps)


class PGD(Attack):
    """Projected gradient descent (ascent on the loss) in the L-inf or L2 ball.

    Args (the rest as :class:`Attack`):
        alpha: step size: a Python float or per-sample [B] tensor.
        steps: number of steps (0: the random start only).
        random_start: linf: uniform in [-eps, eps] then clamp; l2: uniform radius, random direction
            (torchattacks' PGD / PGDL2 starts).
    """

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor = 8 / 255,
        alpha: float | torch.Tensor = 2 / 255,
        steps: int = 10,
        random_start: bool = True,
        *,
        norm: str = "linf",
        loss: str | LossFn = "ce",
        model_mode: str = "eval",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        generator: torch.Generator | None = None,
        backend: str | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(
            model, eps, random_start=random_start, norm=norm, loss=loss, model_mode=model_mode,
            normalization=normalization, generator=generator, backend=backend, precision=precision,
        )
        if not isinstance(alpha, torch.Tensor):
            check_real("alpha", alpha, nonneg=True)
        self.alpha = alpha
        self.steps = check_int("steps", steps, minimum=0)

    def _perturb(self, x_nat, x_adv, labels, eps):
        alpha = check_per_sample("alpha", self.alpha, x_nat.shape[0], x_nat.device, nonneg=True)
        for _ in range(self.steps):
            gf.pgd_step_(x_adv, self._gradient(x_adv, labels), x_nat, alpha=alpha, eps=eps, norm=self.norm,
                         backend=self.backend)
        return x_adv


class FGSM(Attack):
    """Fast gradient sign method: one linf step of size eps from the clean image, no random start
    (``generator`` only draws the labels of ``set_mode_targeted_random``)."""

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor = 8 / 255,
        *,
        loss: str | LossFn = "ce",
        model_mode: str = "eval",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        generator: torch.Generator | None = None,
        backend: str | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__(
            model, eps, random_start=False, norm="linf", loss=loss, model_mode=model_mode,
            normalization=normalization, generator=generator, backend=backend, precision=precision,
        )

    def _perturb(self, x_nat, x_adv, labels, eps):
        # from x_adv == x_nat, pgd_step_'s projection leaves clamp(x + eps sign(grad), 0, 1): FGSM
        return gf.pgd_step_(x_adv, self._gradient(x_adv, labels), x_nat, alpha=eps, eps=eps, norm="linf",
                            backend=self.backend)
