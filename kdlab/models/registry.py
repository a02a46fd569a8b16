"""Name -> constructor registry for every architecture kdlab can build.

Each constructor takes ``num_classes`` and ``input_shape`` (C, H, W) or (D,) and returns an
``nn.Module`` mapping a batch of inputs to logits whose final layer is an ``nn.Linear``
named ``classifier``. ``tv:<name>`` builds a torchvision model by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    """Decorator: ``@register("resnet8")`` on ``fn(num_classes, input_shape, **kw)``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    _load_families()
    return sorted(_REGISTRY)


class UnknownModelError(ConfigError):
    pass


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...] = (3, 32, 32),
                **kwargs) -> nn.Module:
    """Build architecture ``name``; unknown names raise an error listing the known ones."""
    _load_families()
    if name.startswith("tv:"):
        from .torchvision_models import build_torchvision

        return build_torchvision(name[3:], num_classes, **kwargs)
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}, "
            "or tv:<torchvision model name>"
        )
    return _REGISTRY[name](num_classes=num_classes, input_shape=tuple(input_shape), **kwargs)


def _load_families() -> None:
    # Importing a family module runs its @register decorators.
    from . import families  # noqa: F401
