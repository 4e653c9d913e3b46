"""A teacher as users bring one: a WideResNet in RobustBench's module naming (conv1, blockN.layer.i
with bn1/relu1/conv1/bn2/relu2/conv2/convShortcut, bn1, relu, fc) that returns logits only. Written
here for the tests; ``tiny_wrn`` is the factory ``--teacher-factory robustbench_style:tiny_wrn`` calls."""
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.convShortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        o = self.relu1(self.bn1(x))
        y = self.conv2(self.relu2(self.bn2(self.conv1(o))))
        return y + (x if self.convShortcut is None else self.convShortcut(o))


class NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 10, widen: int = 1, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        n, w = (depth - 4) // 6, [8, 8 * widen, 16 * widen, 32 * widen]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1)
        self.block2 = NetworkBlock(n, w[1], w[2], 2)
        self.block3 = NetworkBlock(n, w[2], w[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(w[3]), nn.ReLU(inplace=True)
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        out = self.relu(self.bn1(self.block3(self.block2(self.block1(self.conv1(x))))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def tiny_wrn() -> WideResNet:
    """WRN-10-1 for 1-channel images and 10 classes, freshly initialised (from the global RNG)."""
    return WideResNet()


def not_a_model():
    return "not a model"
