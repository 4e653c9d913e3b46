"""ResNet-18 and PreAct-ResNet-18 for 32x32 inputs (3x3 stem, no max-pool: the CIFAR variants
of He et al. 2016a/b used by ARD, TRADES and RepDistiller)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + short


class ResNet18(nn.Module):
    """forward(x [B, C, 32, 32]) -> (features [B, 512], logits [B, num_classes])."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, *, preact: bool = False) -> None:
        super().__init__()
        block = PreActBlock if preact else BasicBlock
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64) if not preact else None
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [block(cin, cout, stride), block(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.bn_final = nn.BatchNorm2d(512) if preact else None  # pre-activation nets end with bn-relu
        self.feature_dim = 512
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.conv1(x)
        if self.bn1 is not None:
            out = F.relu(self.bn1(out))
        out = self.layers(out)
        if self.bn_final is not None:
            out = F.relu(self.bn_final(out))
        f = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return f, self.fc(f)


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet18:
    return ResNet18(num_classes, in_channels)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet18:
    return ResNet18(num_classes, in_channels, preact=True)
