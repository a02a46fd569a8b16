"""VGG with batch normalisation for small images: vgg8, vgg11, vgg13, vgg16, vgg19 (CIFAR),
vgg6, vgg7 and vgg7x4 (28x28 grayscale: Fashion-MNIST's default pair is vgg6 <- vgg7x4).

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015, with BN after every conv and the CIFAR head of the knowledge-distillation
benchmarks (Tian et al., "Contrastive Representation Distillation", ICLR 2020): five conv
stages separated by 2x2 max-pooling, global average pooling and a single linear classifier
(no 4096-wide fully connected layers). vgg8 has one conv per stage (configuration "S" of
the CRD code); vgg11/13/16/19 are configurations A/B/D/E of the paper.

vgg7 (widths 8/16/32) and vgg7x4 (4x the channels: 32/64/128) have three stages of two
convs each, for 28x28 inputs (28 -> 14 -> 7 before pooling); vgg6 is vgg7 with a single
conv in its first stage. Fashion-MNIST's default student vgg6 costs 1/21 of its teacher
vgg7x4's FLOPs (1.4 vs 29.1 M multiply-adds per 1x28x28 image); vgg7 (1.9 M) trains 1.6x
slower per step on a CPU than vgg6, because its second 28x28 conv dominates the step.

Module paths for feature hooks (32x32 input); stages 2-5 start with their max-pool:

* ``layer1``: 32x32, 64 channels
* ``layer2``: 16x16, 128 channels -- the usual FitNet hint layer
* ``layer3``: 8x8, 256 channels
* ``layer4``: 4x4, 512 channels
* ``layer5``: 2x2, 512 channels -- last feature map before pooling
* ``layerK.i``: the i-th ``ConvBNReLU`` of stage K (``layerK.0`` is the pool for K >= 2)

No operation is in place, so tensors captured by forward hooks are never overwritten.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from .shapes import image_channels
from .shared import init_cifar_weights

# Output channels of the convs in each of the five stages.
_CONFIGS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "vgg16": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "vgg19": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
    "vgg6": ((8,), (16, 16), (32, 32)),
    "vgg7": ((8, 8), (16, 16), (32, 32)),
    "vgg7x4": ((32, 32), (64, 64), (128, 128)),
}


class ConvBNReLU(nn.Sequential):
    """3x3 conv (with bias, as in the reference VGG) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class CifarVGG(nn.Module):
    """Conv stages ``layer1``, ``layer2``, .. (each after the first starts with a 2x2
    max-pool), global average pooling, classifier."""

    def __init__(self, stages: tuple[tuple[int, ...], ...], num_classes: int,
                 in_channels: int = 3):
        super().__init__()
        widths = [in_channels] + [channels[-1] for channels in stages]
        self.stage_names = [f"layer{k}" for k in range(1, len(stages) + 1)]
        for k, (name, channels) in enumerate(zip(self.stage_names, stages, strict=True)):
            self.add_module(name, _stage(widths[k], channels, pool=k > 0))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes)
        init_cifar_weights(self, linear_std=0.01, zero_linear_bias=True)

    def forward(self, x):
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.classifier(self.avgpool(x).flatten(1))


def _stage(in_channels: int, channels: tuple[int, ...], pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.MaxPool2d(2)] if pool else []
    for out_channels in channels:
        layers.append(ConvBNReLU(in_channels, out_channels))
        in_channels = out_channels
    return nn.Sequential(*layers)


def _vgg(name: str, num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32)) -> CifarVGG:
    return CifarVGG(_CONFIGS[name], num_classes, in_channels=image_channels(name, input_shape))


# The architectures (conf/model/<name>.yaml): each a callable of (num_classes, input_shape).
vgg8 = partial(_vgg, "vgg8")
vgg11 = partial(_vgg, "vgg11")
vgg13 = partial(_vgg, "vgg13")
vgg16 = partial(_vgg, "vgg16")
vgg19 = partial(_vgg, "vgg19")
vgg6 = partial(_vgg, "vgg6", input_shape=(1, 28, 28))
vgg7 = partial(_vgg, "vgg7", input_shape=(1, 28, 28))
vgg7x4 = partial(_vgg, "vgg7x4", input_shape=(1, 28, 28))
