"""MobileNetV2 for CIFAR, as the width-0.5 student of the knowledge-distillation benchmarks.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018, in the
CIFAR variant of Tian et al., "Contrastive Representation Distillation", ICLR 2020 (their
``mobile_half``): width multiplier 0.5, expansion ratio 6, a stride-2 stem, the second
stage kept at stride 1 (total downsampling 16, so a 32x32 image ends at 2x2), every
inverted-residual block including its 1x1 expansion conv (also when the ratio is 1), plain
ReLU, and a 1x1 conv to 1280 channels before global pooling.

Module paths for feature hooks (32x32 input, default width 0.5):

* ``conv1``: stem, 16x16, 16 channels
* ``layer1``: 16x16, 8 channels
* ``layer2``: 16x16, 12 channels -- the usual FitNet hint layer
* ``layer3``: 8x8, 16 channels
* ``layer4``: 4x4, 32 channels; ``layer5``: 4x4, 48 channels
* ``layer6``: 2x2, 80 channels; ``layer7``: 2x2, 160 channels
* ``conv2``: 2x2, 1280 channels -- last feature map before pooling
* ``layerK.i``: the i-th ``InvertedResidual`` of stage K

No operation is in place, so tensors captured by forward hooks are never overwritten.
"""

from __future__ import annotations

from torch import nn

from .shapes import image_channels
from .shared import init_cifar_weights, stage

# (expansion ratio or None for the model's ratio, output channels at width 1,
#  number of blocks, stride of the first block) for the seven stages.
_STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),  # stride 2 on ImageNet; kept at 1 for 32x32 inputs
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)
_LAST_CHANNELS = 1280


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BN -> ReLU; ``groups`` makes it depthwise."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1,
                 stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (strided) -> linear 1x1 project; residual if shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = in_channels * expand_ratio
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            ConvBNReLU(in_channels, hidden),
            ConvBNReLU(hidden, hidden, 3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    """Stride-2 stem, seven inverted-residual stages, 1x1 conv to 1280, pooling, classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 0.5,
                 expand_ratio: int = 6):
        super().__init__()
        width = int(32 * width_mult)
        self.conv1 = ConvBNReLU(in_channels, width, 3, stride=2)
        stages = []
        for ratio, channels, num_blocks, stride in _STAGES:
            out_channels = int(channels * width_mult)
            stages.append(stage(InvertedResidual, width, out_channels, num_blocks, stride,
                                 expand_ratio if ratio is None else ratio))
            width = out_channels
        (self.layer1, self.layer2, self.layer3, self.layer4, self.layer5, self.layer6,
         self.layer7) = stages
        last_channels = _LAST_CHANNELS
        if width_mult > 1.0:
            last_channels = _make_divisible(_LAST_CHANNELS * width_mult)
        self.conv2 = ConvBNReLU(width, last_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_cifar_weights(self, linear_std=0.01, zero_linear_bias=True)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        x = self.layer6(x)
        x = self.layer7(x)
        x = self.conv2(x)
        return self.classifier(self.avgpool(x).flatten(1))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going down by over 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def mobilenetv2(num_classes, input_shape=(3, 32, 32), width_mult=0.5, expand_ratio=6):
    return CifarMobileNetV2(num_classes, image_channels("MobileNetV2", input_shape), width_mult,
                            expand_ratio)
