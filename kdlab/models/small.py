"""Small models for digits (1x8x8) and synthetic vector inputs."""

from __future__ import annotations

import math

from torch import nn

from .shapes import image_channels


class MLP(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden) -> classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (128,),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    @property
    def feature_stages(self) -> list[str]:
        """The hidden layers' outputs (after each ReLU)."""
        return [f"body.{i}" for i, m in enumerate(self.body) if isinstance(m, nn.ReLU)]

    def forward(self, x):
        return self.classifier(self.body(x))


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (BN, ReLU, the second one strided), global pooling, classifier."""

    feature_stages = ("features.2", "features.5")  # each block's output (after its ReLU)

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def mlp(num_classes, input_shape, hidden=(128,), dropout=0.0):
    return MLP(math.prod(input_shape), num_classes, tuple(hidden), dropout)


def cnn(num_classes, input_shape, width=32):
    return SmallCNN(image_channels("cnn", input_shape), num_classes, width)
