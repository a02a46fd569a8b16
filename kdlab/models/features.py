"""Forward hooks that collect named intermediate outputs, so model code stays plain."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import Tensor, nn

from ..errors import ConfigError

PENULTIMATE = "penultimate"  # a feature path: the input of the final linear layer


class FeatureHooks:
    """``with FeatureHooks(model, ["layer2"]) as feats: model(x)`` fills ``feats`` by path.

    A path is a module path (``model.named_modules()``: the module's output), or
    ``"penultimate"``: the input of the model's final linear layer (the pooled embedding).
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]):
        self.model = model
        self.paths = tuple(paths)
        self.features: dict[str, Tensor] = {}
        self._handles = []

    def __enter__(self) -> dict[str, Tensor]:
        modules = dict(self.model.named_modules())
        for path in self.paths:
            if path == PENULTIMATE:
                _, head = find_classifier(self.model)
                self._handles.append(head.register_forward_pre_hook(self._store_input(path)))
                continue
            if path not in modules:
                top = ", ".join(n for n, _ in self.model.named_children())
                raise ValueError(f"no module at path {path!r} in {type(self.model).__name__}; "
                                 f"top-level modules: {top}")
            self._handles.append(modules[path].register_forward_hook(self._store(path)))
        return self.features

    def _store(self, path: str):
        def hook(module, inputs, output):
            self.features[path] = output

        return hook

    def _store_input(self, path: str):
        def hook(module, inputs):
            self.features[path] = inputs[0]

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's final linear layer: ``model.classifier`` if it is one, else the last Linear."""
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        return "classifier", head
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer")
    return linears[-1]


def feature_stages(model: nn.Module) -> list[str]:
    """Module paths of the model's stages, shallow to deep: ``model.feature_stages`` when the
    model declares them (the small models), else its ``layer1``, ``layer2``, ... children
    (every CIFAR family, torchvision ResNets)."""
    declared = getattr(model, "feature_stages", None)
    if declared:
        return list(declared)
    names = [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
    return sorted(names, key=lambda n: int(n[len("layer"):]))


def middle_stage(model: nn.Module, option: str = "layer") -> str:
    """The middle stage (``layer2`` of a 3-stage CIFAR net, ``layer3`` of a 5-stage VGG:
    the hint layer of the common CIFAR-100 FitNet recipe)."""
    stages = feature_stages(model)
    if not stages:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"{option}=auto: {type(model).__name__} declares no stages; give a "
                          f"module path (top-level modules: {top})")
    return stages[(len(stages) - 1) // 2]
