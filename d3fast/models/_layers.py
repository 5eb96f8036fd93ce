from __future__ import annotations

import torch
from torch import nn

from d3fast.errors import D3FastError


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Normalisation by name. "instancenorm" is GroupNorm with one group per channel (affine),
    as in the DC/MTT ConvNet: instance statistics with learnable per-channel scale/shift."""
    if kind == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return nn.GroupNorm(1, channels, affine=True)
    if kind == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise D3FastError(f"unknown norm {kind!r}")


def first_conv_padding(res: int, kernel: int) -> int:
    """'Same' padding, plus enough to lift a 28 px input to 32 (MNIST-style data is fed
    to the 32 px networks, as in the DC/MTT code: 3x3 conv -> padding 3)."""
    same = kernel // 2
    return same + (32 - res) // 2 if res == 28 else same


class FeatureClassifier(nn.Module):
    """A conv stack `features_net` whose flattened output (`features`, `feature_dim` wide)
    feeds one Linear `classifier`."""

    features_net: nn.Module
    classifier: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_net(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
