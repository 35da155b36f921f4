"""CIFAR ResNets and their plain counterparts (He et al. 2016, section 4.2).

A 3x3 stem of 16 channels, three stages of n basic blocks at 16/32/64 channels (stride 2 between
stages), global average pooling and a linear classifier: 6n+2 weighted layers. A residual block computes
y = ReLU(F(x) + shortcut(x)) with F = conv3x3-BN-ReLU-conv3x3-BN; the plain block drops the shortcut.
Shortcut A: identity, subsampled by 2 and zero-padded in channels where the shape changes (no
parameters). Shortcut B: a 1x1 convolution + BN projection where the shape changes, identity elsewhere.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = (20, 32, 44, 56, 110)
ARCHS = {f"{kind}{d}": (kind, d) for kind in ("plain", "resnet") for d in DEPTHS}


class PadShortcut(nn.Module):
    """Option A: x[:, :, ::2, ::2] with zero channels appended (parameter-free)."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.extra = extra_channels

    def forward(self, x):
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, residual: bool, shortcut: Literal["A", "B"]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.residual = residual
        self.shortcut = nn.Identity()
        if residual and (stride != 1 or cin != cout):
            self.shortcut = (
                PadShortcut(cout - cin)
                if shortcut == "A"
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + self.shortcut(x)
        return F.relu(out)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, residual: bool, shortcut: Literal["A", "B"] = "A", num_classes: int = 10,
                 in_channels: int = 3):
        super().__init__()
        assert (depth - 2) % 6 == 0, "depth must be 6n+2"
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, cout in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(cin, cout, stride, residual, shortcut))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        self._init_weights()

    def _init_weights(self):
        """He initialisation of the convolutions, as in the paper (its ref. [13])."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in",
                                        nonlinearity="relu")

    def forward(self, x):
        x = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(arch: str, shortcut: Literal["A", "B"] = "A", num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    kind, depth = ARCHS[arch]
    return CifarResNet(depth, residual=kind == "resnet", shortcut=shortcut, num_classes=num_classes,
                       in_channels=in_channels)
