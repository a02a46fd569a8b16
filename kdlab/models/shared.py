"""What the CIFAR model families (ResNets, WRNs, MobileNetV2, ShuffleNets, VGGs) share: the
weight initialisation of the CIFAR knowledge-distillation benchmarks' code, and a stage of
blocks.

The initialisation, in every family: He-normal convolutions (fan_out, ReLU gain) with zero
biases where a conv has one (only the VGGs' do), BatchNorm scale 1 and shift 0. The families
differ only in the classifier (``nn.Linear``): PyTorch's default (ResNets, ShuffleNets), a
zero bias (WRNs), or N(0, 0.01^2) weights and a zero bias (MobileNetV2, VGGs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn


def init_cifar_weights(model: nn.Module, linear_std: float | None = None,
                       zero_linear_bias: bool = False) -> None:
    """Initialise ``model``'s convolutions and BatchNorms in place; its linear layers get
    N(0, linear_std^2) weights if ``linear_std`` is given and a zero bias if
    ``zero_linear_bias`` (else they keep PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if zero_linear_bias:
                nn.init.zeros_(m.bias)


def stage(block: Callable[..., nn.Module], in_channels: int, out_channels: int,
          num_blocks: int, stride: int, *options: Any) -> nn.Sequential:
    """``num_blocks`` blocks ``block(in, out, stride, *options)``: the first takes the
    stage's input and stride, the others keep its width at stride 1."""
    return nn.Sequential(block(in_channels, out_channels, stride, *options),
                         *(block(out_channels, out_channels, 1, *options)
                           for _ in range(num_blocks - 1)))
