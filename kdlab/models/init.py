"""The weight initialisation of the CIFAR model zoo (ResNets, WRNs, MobileNetV2,
ShuffleNets, VGGs), as in the CIFAR knowledge-distillation benchmarks' code.

Every family: He-normal convolutions (fan_out, ReLU gain) with zero biases where a conv has
one (only the VGGs' do), BatchNorm scale 1 and shift 0. The families differ only in the
classifier (``nn.Linear``): PyTorch's default (ResNets, ShuffleNets), a zero bias (WRNs), or
N(0, 0.01^2) weights and a zero bias (MobileNetV2, VGGs).
"""

from __future__ import annotations

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
