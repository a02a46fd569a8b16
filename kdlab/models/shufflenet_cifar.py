"""ShuffleNet V1 and V2 for CIFAR, as the students of the knowledge-distillation benchmarks.

* shufflenetv1: Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural
  Network for Mobile Devices", CVPR 2018 -- groups g=3 (stages of 240/480/960 channels,
  4/8/4 units), 1x1 stem to 24 channels.
* shufflenetv2: Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN
  Architecture Design", ECCV 2018 -- ``net_size`` 1.0 by default (stages of 116/232/464
  channels, each a down-sampling unit followed by 3/7/3 basic units, then a 1x1 conv to
  1024), 3x3 stem to 24 channels.

Both in the CIFAR variant of Tian et al., "Contrastive Representation Distillation", ICLR
2020: the stem has stride 1 and no max-pool, so the three stages run at 16x16, 8x8 and 4x4
for a 32x32 image.

Module paths for feature hooks (32x32 input):

* ``conv1`` / ``bn1``: stem, 32x32, 24 channels
* ``layer1``: 16x16 (240 channels in v1, 116 in v2)
* ``layer2``: 8x8 (480 / 232 channels) -- the usual FitNet hint layer
* ``layer3``: 4x4 (960 / 464 channels)
* ``conv2`` / ``bn2`` (v2 only): 4x4, 1024 channels
* ``layerK.i``: the i-th unit of stage K

No operation is in place, so tensors captured by forward hooks are never overwritten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .shapes import image_channels
from .shared import init_cifar_weights

_V1_STAGES = {"channels": (240, 480, 960), "units": (4, 8, 4), "groups": 3}
_V1_STEM = 24

# net_size -> (stage channels, channels of the final 1x1 conv); each stage has one
# down-sampling unit followed by (3, 7, 3) basic units.
_V2_SIZES: dict[float, tuple[tuple[int, int, int], int]] = {
    0.5: ((48, 96, 192), 1024),
    1.0: ((116, 232, 464), 1024),
    1.5: ((176, 352, 704), 1024),
    2.0: ((244, 488, 976), 2048),
}
_V2_BASIC_UNITS = (3, 7, 3)
_V2_STEM = 24


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: (g, c/g) -> (c/g, g)."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1, added to (or, when strided,
    concatenated with a 3x3 average pool of) the input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, groups: int,
                 first_groups: int | None = None):
        super().__init__()
        self.stride = stride
        # A strided unit concatenates its input, so its branch produces only the rest.
        branch_channels = out_channels - in_channels if stride == 2 else out_channels
        mid = branch_channels // 4
        self.groups1 = groups if first_groups is None else first_groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch_channels)
        self.shortcut = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = channel_shuffle(out, self.groups1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = self.shortcut(x)
        out = torch.cat([out, residual], 1) if self.stride == 2 else out + residual
        return F.relu(out)


class ShuffleNetV1(nn.Module):
    """1x1 stem, three stages of ShuffleNet units (the first of each strided), pooling."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        groups = _V1_STAGES["groups"]
        self.conv1 = nn.Conv2d(in_channels, _V1_STEM, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(_V1_STEM)
        stages, width = [], _V1_STEM
        for channels, units in zip(_V1_STAGES["channels"], _V1_STAGES["units"], strict=True):
            # The paper does not group the first 1x1 conv when its input is the narrow stem.
            first = ShuffleV1Unit(width, channels, 2, groups,
                                  first_groups=1 if width == _V1_STEM else None)
            rest = [ShuffleV1Unit(channels, channels, 1, groups) for _ in range(units - 1)]
            stages.append(nn.Sequential(first, *rest))
            width = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)
        init_cifar_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.classifier(self.avgpool(x).flatten(1))


class ShuffleV2Unit(nn.Module):
    """Split the channels in half; 1x1 -> 3x3 depthwise -> 1x1 on one half; concat; shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)

    def forward(self, x):
        kept, branch = x.chunk(2, dim=1)
        branch = F.relu(self.bn1(self.conv1(branch)))
        branch = self.bn2(self.conv2(branch))
        branch = F.relu(self.bn3(self.conv3(branch)))
        return channel_shuffle(torch.cat([kept, branch], 1), 2)


class ShuffleV2DownUnit(nn.Module):
    """Two strided branches on the full input (depthwise -> 1x1, and 1x1 -> depthwise -> 1x1)
    each giving half the output channels; concat; shuffle."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        half = out_channels // 2
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1, groups=in_channels,
                      bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )
        self.right = nn.Sequential(
            nn.Conv2d(in_channels, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
            nn.Conv2d(half, half, 3, stride=2, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(),
        )

    def forward(self, x):
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(nn.Module):
    """3x3 stem, three stages (down-sampling unit + basic units), 1x1 conv, pooling."""

    def __init__(self, num_classes: int, in_channels: int = 3, net_size: float = 1.0):
        super().__init__()
        if net_size not in _V2_SIZES:
            raise ValueError(f"shufflenetv2 net_size must be one of {sorted(_V2_SIZES)}, "
                             f"got {net_size}")
        stage_channels, last_channels = _V2_SIZES[net_size]
        self.conv1 = nn.Conv2d(in_channels, _V2_STEM, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_V2_STEM)
        stages, width = [], _V2_STEM
        for channels, units in zip(stage_channels, _V2_BASIC_UNITS, strict=True):
            stages.append(nn.Sequential(ShuffleV2DownUnit(width, channels),
                                        *[ShuffleV2Unit(channels) for _ in range(units)]))
            width = channels
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(width, last_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last_channels, num_classes)
        init_cifar_weights(self)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.classifier(self.avgpool(x).flatten(1))


def shufflenetv1(num_classes, input_shape=(3, 32, 32)):
    return ShuffleNetV1(num_classes, image_channels("shufflenetv1", input_shape))


def shufflenetv2(num_classes, input_shape=(3, 32, 32), net_size=1.0):
    return ShuffleNetV2(num_classes, image_channels("shufflenetv2", input_shape),
                        float(net_size))
