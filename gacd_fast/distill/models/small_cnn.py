"""Small CNNs for the 8x8 digits (the demo): the teacher is wider than the student."""
from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """conv-bn-relu x3 (the second one strided), global average pool, linear.

    forward(x) -> (features [B, 4*width], logits [B, num_classes]).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(
            block(in_channels, width, 1), block(width, 2 * width, 2), block(2 * width, 4 * width, 1),
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
