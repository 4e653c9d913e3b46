"""Attacks with torchattacks' interface: ``atk = PGD(model, eps, alpha, steps); x_adv = atk(x, y)``.

Inputs are images in [0, 1]; the result is detached; the model's train/eval flags are restored
module by module; gradients are taken with ``torch.autograd.grad`` so no parameter ``.grad`` is
touched. Each step goes through :func:`gacd_fast.functional.pgd_step_`, so it runs on the fastest
backend available.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import functional as gf
from ._checks import check_int, check_option, check_per_sample, check_real, check_tensor, reads_values

LossFn = Callable[[object, torch.Tensor], torch.Tensor]
MODEL_MODES = ("eval", "train", "keep")


def logits_of(output: object) -> torch.Tensor:
    """The logits of a model output: the output itself, or the last item of a (features, logits) tuple."""
    if isinstance(output, (tuple, list)):
        output = output[-1]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise TypeError(
            "loss='ce' needs the model to return [B, C] logits or a (features, logits) tuple; "
            "pass loss=callable(model_output, targets) for other outputs"
        )
    return output


def cross_entropy(output: object, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the model's logits (torchattacks' PGD loss). targets: [B] class
    indices of any integer dtype (used as int64), or [B, C] floating class probabilities."""
    if not targets.is_floating_point():
        targets = targets.long()
    return F.cross_entropy(logits_of(output), targets)


def _check_targets(targets: object, batch: int) -> None:
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dim() == 0 or targets.shape[0] != batch:
        raise ValueError(f"targets must be a tensor with {batch} rows like images, got {tuple(targets.shape)}")
    if targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must hold integer class indices or float probabilities, got {targets.dtype}")


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


class PGD:
    """Projected gradient descent (ascent on the loss) in the L-inf or L2 ball.

    Args:
        model: maps images [B, C, H, W] (after ``normalization``) to logits, a (features,
            logits) tuple, or whatever ``loss`` understands.
        eps, alpha: radius and step size: Python floats or per-sample [B] tensors.
        steps: number of steps (0: the random start only).
        random_start: linf: uniform in [-eps, eps] then clamp; l2: uniform radius, random direction
            (torchattacks' PGD / PGDL2 starts).
        norm: "linf" or "l2".
        loss: "ce" (mean cross-entropy, as torchattacks) or ``callable(model_output, targets)``
            returning a scalar to maximise (e.g. the GACD contrastive objective).
        model_mode: "eval" (default, as torchattacks), "train" or "keep".
        normalization: (mean, std) per channel applied inside the attack, or None.
        generator: torch.Generator for the random start (reproducible attacks).
        backend: backend for the step (None: the current selection).
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
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        for name, v in (("eps", eps), ("alpha", alpha)):
            if not isinstance(v, torch.Tensor):
                check_real(name, v, nonneg=True)
        self.eps, self.alpha = eps, alpha
        self.steps = check_int("steps", steps, minimum=0)
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
        self.normalization = self._check_normalization(normalization)
        self.generator = generator
        self.backend = backend

    @staticmethod
    def _check_normalization(norm):
        if norm is None:
            return None
        if not isinstance(norm, (tuple, list)) or len(norm) != 2:
            raise ValueError(f"normalization must be (mean, std) or None, got {norm!r}")
        mean, std = (torch.as_tensor(v, dtype=torch.float32).flatten() for v in norm)
        if mean.shape != std.shape:
            raise ValueError(f"normalization mean and std must have the same length, got {tuple(mean.shape)} and {tuple(std.shape)}")
        if bool((std <= 0).any()):
            raise ValueError(f"normalization std must be > 0, got {std.tolist()}")
        return mean, std

    def _check_images(self, images: torch.Tensor) -> None:
        check_tensor("images", images, min_ndim=2)
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

    def _gradient(self, x_adv: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """d loss / d x_adv for one step; the loss must be a scalar tensor that depends on x_adv."""
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            cost = self.loss_fn(self._forward(x_adv), targets)
            if not isinstance(cost, torch.Tensor) or cost.numel() != 1:
                got = tuple(cost.shape) if isinstance(cost, torch.Tensor) else type(cost).__name__
                raise TypeError(f"loss must return a scalar tensor (one element), got {got}")
            if not cost.requires_grad:
                raise ValueError("loss must depend on the model's output (its result does not require grad)")
            (grad,) = torch.autograd.grad(cost.reshape(()), x_adv)
        return grad

    def _forward(self, x: torch.Tensor) -> object:
        if self.normalization is not None:
            mean, std = (v.to(x.device, x.dtype).view(1, -1, *([1] * (x.dim() - 2))) for v in self.normalization)
            x = (x - mean) / std
        return self.model(x)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Adversarial images [B, ...] in [0, 1], detached, same dtype as ``images``."""
        return self.forward(images, targets)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("PGD needs autograd for the input gradient: call it outside torch.inference_mode() "
                               "(torch.no_grad() is fine)")
        self._check_images(images)
        _check_targets(targets, images.shape[0])
        eps = check_per_sample("eps", self.eps, images.shape[0], images.device, nonneg=True)
        alpha = check_per_sample("alpha", self.alpha, images.shape[0], images.device)
        # a clone of an inference tensor (made under inference_mode) is a normal tensor autograd accepts
        x_nat = images.clone() if images.is_inference() else images.detach()
        with model_mode(self.model, self.model_mode):
            if self.random_start:
                x_adv = gf.pgd_random_start(x_nat, eps=eps, norm=self.norm, generator=self.generator, backend=self.backend)
            else:
                x_adv = x_nat.clone()
            for _ in range(self.steps):
                grad = self._gradient(x_adv, targets)
                x_adv = x_adv.detach()
                gf.pgd_step_(x_adv, grad, x_nat, alpha=alpha, eps=eps, norm=self.norm, backend=self.backend)
        return x_adv


class FGSM(PGD):
    """Fast gradient sign method: one linf step of size eps from the clean image, no random start."""

    def __init__(
        self,
        model: nn.Module,
        eps: float | torch.Tensor = 8 / 255,
        *,
        loss: str | LossFn = "ce",
        model_mode: str = "eval",
        normalization: tuple[Sequence[float], Sequence[float]] | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            model, eps=eps, alpha=eps, steps=1, random_start=False, norm="linf", loss=loss,
            model_mode=model_mode, normalization=normalization, backend=backend,
        )
