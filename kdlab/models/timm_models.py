"""timm architectures by name (``pip install 'kdlab[timm]'``): where ImageNet users find
their models."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError


def timm_model(model_name: str, num_classes: int, input_shape=None, pretrained: bool = False,
               **kwargs) -> nn.Module:
    """``conf/model/timm.yaml``: ``student=timm student.model_name=resnet18`` (any name of
    ``timm.list_models()``; other keys go to ``timm.create_model``). ``pretrained: true``
    downloads timm's weights (from the Hugging Face hub) into the model; ``input_shape`` is
    kdlab's and not timm's, so it is not passed on."""
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models need timm: pip install 'kdlab[timm]'") from None
    if model_name not in timm.list_models():
        raise ConfigError(f"unknown timm model {model_name!r}; see timm.list_models() "
                          "(e.g. resnet18, mobilenetv1_100, efficientnet_b0)")
    return timm.create_model(model_name, pretrained=pretrained, num_classes=num_classes,
                             **kwargs)
