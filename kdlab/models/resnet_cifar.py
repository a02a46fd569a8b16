"""CIFAR ResNets: resnet8 ... resnet110 and the wide-stage resnet8x4 / resnet32x4.

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (section 4.2, the
6n+2-layer CIFAR networks), in the variant used by the CIFAR knowledge-distillation
benchmarks of Tian et al., "Contrastive Representation Distillation", ICLR 2020: basic
blocks, projection (1x1 conv + BN) shortcuts whenever the shape changes, and the "x4"
models that widen every stage by four (stem 32, stages 64/128/256).

Module paths for feature hooks (32x32 input):

* ``conv1`` / ``bn1``: stem, 32x32
* ``layer1``: 32x32, 16 channels (64 for x4)
* ``layer2``: 16x16, 32 channels (128 for x4) -- the usual FitNet hint layer
* ``layer3``: 8x8, 64 channels (256 for x4) -- last feature map before pooling
* ``layerK.i``: the i-th ``BasicBlock`` of stage K; ``layerK.i.bn2`` is its pre-activation

No operation is in place, so tensors captured by forward hooks are never overwritten.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import nn

from .shapes import image_channels
from .shared import init_cifar_weights, stage

# Stem width followed by the widths of the three stages.
_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; ReLU after the residual sum; 1x1-conv shortcut on a shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, three stages of ``(depth - 2) / 6`` basic blocks, global pooling, classifier."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int,
                 in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        stem, *stages = widths
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.layer1 = stage(BasicBlock, stem, stages[0], blocks_per_stage, 1)
        self.layer2 = stage(BasicBlock, stages[0], stages[1], blocks_per_stage, 2)
        self.layer3 = stage(BasicBlock, stages[1], stages[2], blocks_per_stage, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(stages[2], num_classes)
        init_cifar_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.avgpool(x).flatten(1))


def _resnet(depth: int, widths: tuple[int, int, int, int], num_classes: int,
            input_shape: tuple[int, ...] = (3, 32, 32)) -> CifarResNet:
    return CifarResNet(depth, widths, num_classes,
                       in_channels=image_channels("CIFAR ResNets", input_shape))


# The architectures (conf/model/<name>.yaml): each a callable of (num_classes, input_shape).
resnet8 = partial(_resnet, 8, _NARROW)
resnet14 = partial(_resnet, 14, _NARROW)
resnet20 = partial(_resnet, 20, _NARROW)
resnet32 = partial(_resnet, 32, _NARROW)
resnet44 = partial(_resnet, 44, _NARROW)
resnet56 = partial(_resnet, 56, _NARROW)
resnet110 = partial(_resnet, 110, _NARROW)
resnet8x4 = partial(_resnet, 8, _WIDE)
resnet32x4 = partial(_resnet, 32, _WIDE)
