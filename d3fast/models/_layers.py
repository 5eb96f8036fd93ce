from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3fast.errors import D3FastError


class GroupNorm32(nn.GroupNorm):
    """nn.GroupNorm (same parameters and state dict) that normalises in float32 under
    autocast. Autocast leaves group_norm in bf16 on the CPU, and under torch.func.vmap (the
    unroll's per-student gradients) on any device; its mean and variance over a 4x4 map
    of bf16 values lose 2-3 digits, and the unroll's double backward amplifies that. The
    output is float32; the next convolution casts it back under autocast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if not torch.is_autocast_enabled(dev):
            return super().forward(x)
        with torch.autocast(dev, enabled=False):
            return F.group_norm(x.float(), self.num_groups, self.weight, self.bias, self.eps)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """Normalisation by name. "instancenorm" is GroupNorm with one group per channel (affine),
    as in the DC/MTT ConvNet: instance statistics with learnable per-channel scale/shift.
    Group norms compute in float32 under autocast (GroupNorm32)."""
    if kind == "instancenorm":
        return GroupNorm32(channels, channels, affine=True)
    if kind == "batchnorm":
        return nn.BatchNorm2d(channels)
    if kind == "layernorm":
        return GroupNorm32(1, channels, affine=True)
    if kind == "groupnorm":
        return GroupNorm32(4, channels, affine=True)
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
