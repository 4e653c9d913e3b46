"""Models of the pipeline (no torchvision). Every forward returns ``(features, logits)`` with
the penultimate pooled features, and every model has ``feature_dim``."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .mobilenetv2 import MobileNetV2, mobilenetv2
from .resnet import ResNet18, preact_resnet18, resnet18
from .small_cnn import (
    SmallCNN,
    small_cnn_student,
    small_cnn_student_stride2,
    small_cnn_teacher,
    small_cnn_teacher_stride2,
)
from .wide_resnet import WideResNet, wrn_34_10

MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn_teacher": small_cnn_teacher,
    "small_cnn_student": small_cnn_student,
    "small_cnn_teacher_stride2": small_cnn_teacher_stride2,
    "small_cnn_student_stride2": small_cnn_student_stride2,
    "resnet18": resnet18,
    "preact_resnet18": preact_resnet18,
    "wrn_34_10": wrn_34_10,
    "mobilenetv2": mobilenetv2,
}


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A model from MODELS by name."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)


__all__ = ["MODELS", "build_model", "SmallCNN", "ResNet18", "WideResNet", "MobileNetV2"]
