"""Small CNNs for the digits: 8x8 (the demo) and, with a strided stem, 28x28 (MNIST-5k). The teacher
is wider than the student."""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu x3 (the second one strided; the first too with ``stem_stride=2``, for 28x28
    inputs: a quarter of the compute), global average pool, linear.

    forward(x) -> (features [B, 4*width], logits [B, num_classes]).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16, stem_stride: int = 1) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(in_channels, width, stem_stride), block(width, 2 * width, 2), block(2 * width, 4 * width, 1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = 4 * width
        self.fc = nn.Linear(self.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.pool(self.body(x)).flatten(1)
        return f, self.fc(f)


def small_cnn_teacher(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width=32)


def small_cnn_student(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width=12)


def small_cnn_teacher_stride2(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width=32, stem_stride=2)


def small_cnn_student_stride2(num_classes: int = 10, in_channels: int = 1) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, width=12, stem_stride=2)
