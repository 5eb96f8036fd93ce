from __future__ import annotations

from torch import nn

from d3fast.models._layers import FeatureClassifier, first_conv_padding


class AlexNet(FeatureClassifier):
    """AlexNet as in the dataset-distillation code: 5x5 convs of 128 and 192 channels, three
    3x3 convs, three 2x2 max-pools, no normalisation, one Linear (192 x 4 x 4 at 32 px)."""

    def __init__(self, in_channels: int, num_classes: int, res: int):
        super().__init__()
        pad = first_conv_padding(res, 5)
        self.features_net = nn.Sequential(
            nn.Conv2d(in_channels, 128, 5, padding=pad),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(128, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(192, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(192, 192, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2, 2),
        )
        side = (res + 2 * pad - 4) // 8
        self.feature_dim = 192 * side * side
        self.classifier = nn.Linear(self.feature_dim, num_classes)
