from __future__ import annotations

from torch import nn

from d3fast.errors import D3FastError
from d3fast.models._layers import FeatureClassifier, first_conv_padding, norm_layer


def default_depth(res: int) -> int:
    """3 blocks at 28/32 px, 4 at 64 px, 5 at 128 px: the conv stack ends at 4x4."""
    effective = 32 if res == 28 else res
    depth = effective.bit_length() - 3
    if effective != 1 << (depth + 2) or depth < 1:
        raise D3FastError(f"ConvNet needs a power-of-two resolution >= 8 (or 28), got {res}")
    return depth


class ConvNet(FeatureClassifier):
    """The dataset-distillation ConvNet: `depth` x [Conv3x3(width) -> norm -> ReLU -> pool]
    then Linear. `features(x)` is the flattened conv output that MMD matches
    (2048-d = 128 x 4 x 4 for ConvNet-3 at 32 px, -4 at 64 px, -5 at 128 px).

    Args:
        in_channels: image channels (1 or 3).
        num_classes: outputs of the final Linear.
        res: input side in pixels (28, 32, 64, 128, ...).
        width: channels of every conv. Default: 128.
        depth: conv blocks; 0 picks by resolution. Default: 0.
        norm: instancenorm | batchnorm | layernorm | groupnorm | none. Default: instancenorm.
        pooling: avgpooling | maxpooling | none. Default: avgpooling.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        res: int,
        width: int = 128,
        depth: int = 0,
        norm: str = "instancenorm",
        pooling: str = "avgpooling",
    ):
        super().__init__()
        depth = depth or default_depth(res)
        side = 32 if res == 28 else res
        if pooling != "none" and side >> depth < 1:
            raise D3FastError(f"net.depth={depth} halves {res} px below 1 px: at most {side.bit_length() - 1} here")
        layers: list[nn.Module] = []
        c, side = in_channels, res
        for d in range(depth):
            pad = first_conv_padding(res, 3) if d == 0 else 1
            layers += [nn.Conv2d(c, width, 3, padding=pad), norm_layer(norm, width), nn.ReLU(inplace=True)]
            side = side + 2 * pad - 2
            if pooling == "avgpooling":
                layers.append(nn.AvgPool2d(2))
            elif pooling == "maxpooling":
                layers.append(nn.MaxPool2d(2))
            elif pooling != "none":
                raise D3FastError(f"unknown pooling {pooling!r}")
            if pooling != "none":
                side //= 2
            c = width
        self.features_net = nn.Sequential(*layers)
        self.feature_dim = width * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)
