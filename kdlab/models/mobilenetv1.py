"""MobileNetV1 for ImageNet, the student of the ResNet-50 -> MobileNet-V1 KD benchmark.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", arXiv 1704.04861, Table 1 at width multiplier 1: a full 3x3 stride-2 conv to
32 channels, then 13 depthwise-separable blocks (a 3x3 depthwise conv, then a 1x1 pointwise
conv, each followed by BatchNorm and ReLU), global average pooling and one linear layer.
At 224x224 it does about 569 M multiply-adds and has about 4.2 M parameters (the paper's
Table 2). (The paper's table prints stride 2 for the last depthwise conv; its output size,
7x7, and every implementation use stride 1, as here.)

Module paths for feature hooks (224x224 input, width 1):

* ``conv1``: stem, 112x112, 32 channels
* ``layer1``: 112x112, 64 channels (block 1)
* ``layer2``: 56x56, 128 channels (blocks 2-3)
* ``layer3``: 28x28, 256 channels (blocks 4-5)
* ``layer4``: 14x14, 512 channels (blocks 6-11)
* ``layer5``: 7x7, 1024 channels (blocks 12-13) -- last feature map before pooling

No operation is in place, so tensors captured by forward hooks are never overwritten.
"""

from __future__ import annotations

from torch import nn

from .mobilenetv2_cifar import ConvBNReLU
from .shapes import image_channels
from .shared import init_cifar_weights

# The paper's Table 1 after the stem, as stages: (output channels at width 1, stride of each
# depthwise-separable block).
_STAGES: tuple[tuple[tuple[int, int], ...], ...] = (
    ((64, 1),),
    ((128, 2), (128, 1)),
    ((256, 2), (256, 1)),
    ((512, 2), (512, 1), (512, 1), (512, 1), (512, 1), (512, 1)),
    ((1024, 2), (1024, 1)),
)


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv (strided) -> BN -> ReLU -> 1x1 pointwise conv -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(ConvBNReLU(in_channels, in_channels, 3, stride=stride,
                                    groups=in_channels),
                         ConvBNReLU(in_channels, out_channels))


class MobileNetV1(nn.Module):
    """Stem conv, five stages of depthwise-separable blocks, pooling, classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        width = int(32 * width_mult)
        self.conv1 = ConvBNReLU(in_channels, width, 3, stride=2)
        stages = []
        for blocks in _STAGES:
            layers = []
            for channels, stride in blocks:
                out_channels = int(channels * width_mult)
                layers.append(DepthwiseSeparable(width, out_channels, stride))
                width = out_channels
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4, self.layer5 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        init_cifar_weights(self, linear_std=0.01, zero_linear_bias=True)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        return self.classifier(self.avgpool(x).flatten(1))


def mobilenetv1(num_classes, input_shape=(3, 224, 224), width_mult=1.0):
    return MobileNetV1(num_classes, image_channels("MobileNetV1", input_shape), width_mult)
