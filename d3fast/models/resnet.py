from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3fast.models._layers import first_conv_padding, norm_layer


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(norm, cout)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 as in the dataset-distillation code (CIFAR-style stem: 3x3 conv, stride 1,
    no max-pool), instance norm by default, global average pooling so that 64 and 128 px
    inputs work unchanged (at 32 px it equals the reference's 4x4 average pool)."""

    def __init__(self, in_channels: int, num_classes: int, res: int, norm: str = "instancenorm"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, first_conv_padding(res, 3), bias=False)
        self.bn1 = norm_layer(norm, 64)
        blocks, c = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c, cout, stride, norm), BasicBlock(cout, cout, 1, norm)]
            c = cout
        self.layers = nn.Sequential(*blocks)
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
