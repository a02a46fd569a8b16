"""Distillation methods: one file per method, one YAML per method in conf/method/."""

from typing import Any

from hydra.utils import instantiate

from ..errors import ConfigError, unwrap_error
from .base import Method, Outputs


def instantiate_method(node: Any) -> Method:
    """The method of a ``method`` config node (a DictConfig or a plain dict)."""
    try:
        method = instantiate(node, _convert_="all")
    except Exception as e:
        raise unwrap_error(e, "method") from None
    if not isinstance(method, Method):
        raise ConfigError(f"method._target_ {node['_target_']} is not a kdlab Method "
                          "(subclass kdlab.methods.base.Method)")
    return method


__all__ = ["Method", "Outputs", "instantiate_method"]
