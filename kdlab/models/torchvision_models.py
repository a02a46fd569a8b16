"""torchvision architectures by name, for inputs larger than CIFAR's 32x32."""

from __future__ import annotations

from torch import nn

from .registry import UnknownModelError


def build_torchvision(name: str, num_classes: int, input_shape=None, **kwargs) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise UnknownModelError(
            f"unknown torchvision model {name!r}; available: {', '.join(sorted(names))}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
