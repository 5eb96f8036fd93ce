from __future__ import annotations

from torch import nn

from d3fast.models._layers import FeatureClassifier, first_conv_padding, norm_layer

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(FeatureClassifier):
    """VGG-11 as in the dataset-distillation code: 3x3 convs with instance norm by default,
    five 2x2 max-pools, one Linear on the flattened map (512-d at 32 px; 512 x (res/32)^2
    at larger inputs)."""

    def __init__(self, in_channels: int, num_classes: int, res: int, norm: str = "instancenorm"):
        super().__init__()
        layers: list[nn.Module] = []
        c, side, first = in_channels, res, True
        for v in VGG11_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                side //= 2
                continue
            pad = first_conv_padding(res, 3) if first else 1
            layers += [nn.Conv2d(c, int(v), 3, padding=pad), norm_layer(norm, int(v)), nn.ReLU(inplace=True)]
            side += 2 * pad - 2
            c, first = int(v), False
        self.features_net = nn.Sequential(*layers)
        self.feature_dim = 512 * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)
