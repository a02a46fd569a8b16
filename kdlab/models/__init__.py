"""Model zoo: every architecture is a config, ``conf/model/<name>.yaml``.

A model config is a ``_target_`` (a constructor taking ``num_classes`` and ``input_shape``,
(C, H, W) or (D,), and returning an ``nn.Module`` whose final layer is an ``nn.Linear``)
plus its options. The file name is the architecture's one name: ``student=resnet8x4`` and
``teacher=resnet32x4`` choose from the same files, and a user's own model is a YAML with
``_target_: my_package.MyNet`` in their own config directory (found through Hydra's config
search path: ``--config-dir``, ``hydra.searchpath``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import group_options, read_group
from ..errors import ConfigError, unwrap_error


class UnknownModelError(ConfigError):
    pass


def model_names() -> list[str]:
    """The architectures on the config search path (kdlab's ``conf/model/*.yaml`` and the
    user's)."""
    return group_options("model")


def model_config(name: str) -> DictConfig:
    """The config ``conf/model/<name>.yaml`` (kdlab's, else from the user's directories)."""
    try:
        return read_group("model", name)
    except MissingConfigException as e:
        options = e.options or model_names()
        raise UnknownModelError(f"unknown model {name!r}; available: {', '.join(options)}"
                                ) from None


def build_model(spec: str | Mapping[str, Any], num_classes: int,
                input_shape: tuple[int, ...] = (3, 32, 32), where: str = "model",
                **options: Any) -> nn.Module:
    """An untrained model from a config node (``_target_`` + options) or a model name.

    ``options`` override the config's (``build_model("cnn", 10, (1, 8, 8), width=8)``);
    ``where`` names the config key in errors (``student``, ``teacher``).
    """
    node = model_config(spec) if isinstance(spec, str) else OmegaConf.create(dict(spec))
    if "_target_" not in node:
        raise ConfigError(f"{where} needs a _target_ (got keys {sorted(node)})")
    node = OmegaConf.merge(node, options)
    try:
        return instantiate(node, num_classes=int(num_classes), input_shape=tuple(input_shape),
                           _convert_="all")
    except Exception as e:  # Hydra wraps constructor errors: surface ours, name the key
        raise unwrap_error(e, where) from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(name: str, model: nn.Module) -> dict[str, Any]:
    """What results.json and the summary say about a model: option name and architecture."""
    return {"name": name, "arch": type(model).__name__, "params": count_parameters(model)}


__all__ = ["UnknownModelError", "build_model", "count_parameters", "describe_model",
           "model_config", "model_names"]
