"""torchvision architectures by name, for inputs larger than CIFAR's 32x32."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError


def torchvision_model(name: str, num_classes: int, input_shape=None, **kwargs) -> nn.Module:
    """``conf/model/tv_resnet18.yaml``: ``name: resnet18``; untrained (``teacher.ckpt=tv:...``
    loads torchvision's weights)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        raise ConfigError(
            f"unknown torchvision model {name!r}; available: {', '.join(sorted(names))}")
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
