"""Networks by name. Every classifier has `features(x)` (the input of its final Linear)
and `feature_dim`."""

from __future__ import annotations

from torch import nn

from d3fast.config import NETWORKS, NetConfig
from d3fast.errors import D3FastError
from d3fast.models.alexnet import AlexNet
from d3fast.models.convnet import ConvNet, default_depth
from d3fast.models.decoder import Decoder
from d3fast.models.resnet import ResNet18
from d3fast.models.vgg import VGG11


def build_network(
    net: str | NetConfig,
    in_channels: int,
    num_classes: int,
    res: int,
    *,
    width: int = 128,
    depth: int = 0,
    norm: str = "instancenorm",
    pooling: str = "avgpooling",
) -> nn.Module:
    """The one constructor of a classifier: `net` is a config's `net` section (its name,
    width, depth, norm and pooling) or an architecture's name with the keywords; `width`,
    `depth` and `pooling` apply to the ConvNet only. Input [B, in_channels, res, res].

    Raises:
        D3FastError: an unknown architecture."""
    name: str
    if isinstance(net, NetConfig):
        name, width, depth, norm, pooling = net.name, net.width, net.depth, net.norm, net.pooling
    else:
        name = net
    if name == "convnet":
        return ConvNet(in_channels, num_classes, res, width, depth, norm, pooling)
    if name == "resnet18":
        return ResNet18(in_channels, num_classes, res, norm)
    if name == "vgg11":
        return VGG11(in_channels, num_classes, res, norm)
    if name == "alexnet":
        return AlexNet(in_channels, num_classes, res)
    raise D3FastError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


__all__ = [
    "NETWORKS", "AlexNet", "ConvNet", "Decoder", "ResNet18", "VGG11",
    "build_network", "count_parameters", "default_depth",
]
