"""A teacher from any model: ``--teacher-factory module:function`` builds it, ``--teacher-weights``
loads a state dict into it, :class:`gacd_fast.FeatureTap` (``--feature-layer``) makes it return
``(features, logits)`` like the pipeline's own models, and ``--teacher-normalization`` puts the input
normalisation it was trained with in front of it. Every error names the option at fault.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

import torch
from torch import nn

from .. import FeatureTap

# the options of this module; a config without --teacher-factory must leave the others unset
OPTIONS = ("teacher_factory", "teacher_weights", "feature_layer", "teacher_normalization")


class Normalized(nn.Module):
    """``model((x - mean) / std)`` with per-channel ``mean``, ``std`` (buffers [1, C, 1, 1]): a model
    trained on normalised inputs, fed the pipeline's images in [0, 1]."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> Any:
        return self.model((x - self.mean) / self.std)


def check_options(cfg: Any) -> None:
    """ValueError naming the option when --teacher-weights/--feature-layer/--teacher-normalization
    come without --teacher-factory, or --teacher-factory with --teacher."""
    if getattr(cfg, "teacher_factory", None):
        if getattr(cfg, "teacher", None):
            raise ValueError("give either --teacher (a gacd-fast checkpoint) or --teacher-factory, not both")
        parse_normalization(cfg.teacher_normalization)
        return
    given = [o for o in OPTIONS[1:] if getattr(cfg, o, None) is not None]
    if given:
        flags = ", ".join("--" + o.replace("_", "-") for o in given)
        raise ValueError(f"{flags} describe(s) a teacher built by --teacher-factory module:function; give that too")


def parse_normalization(text: str | None) -> tuple[list[float], list[float]] | None:
    """"m1,...,mk,s1,...,sk" (k means, then k standard deviations; k = 1 applies to every channel)
    -> (means, stds); None -> None."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        values = []
    if not values or len(values) % 2:
        raise ValueError(f"--teacher-normalization must be 'mean,std' per channel: k means then k stds, comma-separated "
                         f"(e.g. 0.1307,0.3081 or 0.4914,0.4822,0.4465,0.2471,0.2435,0.2616), got {text!r}")
    k = len(values) // 2
    mean, std = values[:k], values[k:]
    if any(s <= 0 for s in std) or not all(map(_finite, values)):
        raise ValueError(f"--teacher-normalization: the stds must be > 0 and every value finite, got means {mean}, stds {std}")
    return mean, std


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def build_from_factory(spec: str) -> nn.Module:
    """The model ``spec`` = "module:function" (a dotted module on sys.path, a dotted attribute path
    in it) builds when called with no arguments."""
    module_name, sep, qualname = spec.partition(":")
    if not (module_name and sep and qualname):
        raise ValueError(f"--teacher-factory must be 'module:function' (e.g. mypkg.models:robust_wrn), got {spec!r}")
    try:
        factory: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--teacher-factory {spec}: cannot import {module_name!r} ({e}); it must be importable "
                         "(installed, or on PYTHONPATH)") from None
    for attr in qualname.split("."):
        if not hasattr(factory, attr):
            raise ValueError(f"--teacher-factory {spec}: {module_name} has no {qualname!r}")
        factory = getattr(factory, attr)
    if not callable(factory):
        raise ValueError(f"--teacher-factory {spec}: {qualname} is not callable ({type(factory).__name__})")
    try:
        model = factory()
    except Exception as e:
        raise ValueError(f"--teacher-factory {spec}: calling {qualname}() failed ({type(e).__name__}: {e}); "
                         "the factory is called with no arguments") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"--teacher-factory {spec}: {qualname}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load the state dict in ``path`` into ``model`` (strict): a plain state dict, or one under
    "state_dict", with or without DataParallel's "module." prefix; read with weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--teacher-weights: file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--teacher-weights {path}: not a tensor file torch.load(weights_only=True) can read "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--teacher-weights {path}: expected a state dict (name -> tensor) or {{'state_dict': ...}}, "
                         f"got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"--teacher-weights {path} does not fit the --teacher-factory model: "
                         f"missing {result.missing_keys[:5]}{' ...' if len(result.missing_keys) > 5 else ''}, "
                         f"unexpected {result.unexpected_keys[:5]}{' ...' if len(result.unexpected_keys) > 5 else ''}")


def build_external_teacher(cfg: Any, example: torch.Tensor, num_classes: int,
                           device: torch.device | str = "cpu") -> nn.Module:
    """The teacher of ``cfg``'s --teacher-factory (weights loaded, features tapped at
    --feature-layer, --teacher-normalization in front) as a ``(features, logits)`` module in eval
    mode on ``device`` with ``feature_dim`` set, checked on ``example`` (a few training images
    [B, C, H, W] in [0, 1]): it must give [B, ``num_classes``] logits."""
    with torch.random.fork_rng(devices=[]):  # the factory's initialisation leaves the run's RNG stream alone
        model = build_from_factory(cfg.teacher_factory)
    if cfg.teacher_weights:
        load_weights(model, cfg.teacher_weights)
    try:
        teacher: nn.Module = FeatureTap(model, cfg.feature_layer)
    except ValueError as e:
        raise ValueError(f"--feature-layer: {e}") from None
    norm = parse_normalization(cfg.teacher_normalization)
    if norm is not None:
        if len(norm[0]) not in (1, example.shape[1]):
            raise ValueError(f"--teacher-normalization has {len(norm[0])} means and stds, the images have "
                             f"{example.shape[1]} channels")
        teacher = Normalized(teacher, *norm)
    teacher.to(device).eval()
    try:
        with torch.no_grad():
            features, logits = teacher(example.to(device))
    except Exception as e:
        raise ValueError(f"--teacher-factory {cfg.teacher_factory}: the model fails on this data set's images "
                         f"{tuple(example.shape)} ({type(e).__name__}: {e})") from None
    if logits.shape[1] != num_classes:
        raise ValueError(f"--teacher-factory {cfg.teacher_factory}: the model gives {logits.shape[1]} logits, "
                         f"this data set has {num_classes} classes")
    teacher.feature_dim = int(features.shape[1])
    return teacher
