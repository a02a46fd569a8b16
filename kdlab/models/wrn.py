"""Wide residual networks for CIFAR: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation basic blocks
(BN-ReLU-conv twice), depth 6n+4, a 16-channel stem and stages of 16k, 32k and 64k channels
for widen factor k, with a 1x1-conv shortcut whenever the channel count changes. These are
the WRN-d-k teachers and students of the CIFAR knowledge-distillation benchmarks (Tian et
al., "Contrastive Representation Distillation", ICLR 2020).

Module paths for feature hooks (32x32 input):

* ``conv1``: stem, 32x32, 16 channels
* ``layer1``: 32x32, 16k channels
* ``layer2``: 16x16, 32k channels -- the usual FitNet hint layer
* ``layer3``: 8x8, 64k channels (pre-activation: the final ``bn``/ReLU follow it)
* ``layerK.i``: the i-th ``PreActBlock`` of stage K

Stage outputs are pre-activations (as always in pre-activation networks). No operation is
in place, so tensors captured by forward hooks are never overwritten.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import nn

from .shapes import image_channels
from .shared import init_cifar_weights, stage


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 (strided) -> BN-ReLU-[dropout]-conv3x3, plus identity or 1x1 shortcut.

    When the channel count changes the shortcut projects the *activated* input, as in the
    original WRN code.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        residual = x if self.shortcut is None else self.shortcut(activated)
        return out + residual


class WideResNet(nn.Module):
    """3x3 stem, three stages of ``(depth - 4) / 6`` pre-activation blocks, BN-ReLU, pooling."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.layer1 = stage(PreActBlock, 16, widths[0], blocks_per_stage, 1, dropout)
        self.layer2 = stage(PreActBlock, widths[0], widths[1], blocks_per_stage, 2, dropout)
        self.layer3 = stage(PreActBlock, widths[1], widths[2], blocks_per_stage, 2, dropout)
        self.bn = nn.BatchNorm2d(widths[2])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[2], num_classes)
        init_cifar_weights(self, zero_linear_bias=True)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.classifier(self.avgpool(x).flatten(1))


def _wrn(depth: int, widen_factor: int, num_classes: int,
         input_shape: tuple[int, ...] = (3, 32, 32), dropout: float = 0.0) -> WideResNet:
    return WideResNet(depth, widen_factor, num_classes, image_channels("WRNs", input_shape),
                      dropout)


# The architectures (conf/model/<name>.yaml): each a callable of (num_classes, input_shape,
# dropout).
wrn_16_1 = partial(_wrn, 16, 1)
wrn_16_2 = partial(_wrn, 16, 2)
wrn_40_1 = partial(_wrn, 40, 1)
wrn_40_2 = partial(_wrn, 40, 2)
