"""Imports every architecture family so their ``@register`` calls run."""

from . import (  # noqa: F401
    mobilenetv2_cifar,
    resnet_cifar,
    shufflenet_cifar,
    small,
    vgg_cifar,
    wrn,
)
