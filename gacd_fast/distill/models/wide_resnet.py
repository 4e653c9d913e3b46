"""WideResNet (Zagoruyko & Komodakis 2016) for 32x32 inputs; WRN-34-10 is the TRADES teacher."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        short = self.shortcut(o) if self.shortcut is not None else x
        o = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return o + short


class WideResNet(nn.Module):
    """WRN-depth-widen; forward(x) -> (features [B, 64*widen], logits)."""

    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, cin = [], widths[0]
        for cout, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                blocks.append(WideBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        o = F.relu(self.bn(self.blocks(self.conv1(x))))
        f = F.adaptive_avg_pool2d(o, 1).flatten(1)
        return f, self.fc(f)


def wrn_34_10(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(34, 10, num_classes, in_channels)
