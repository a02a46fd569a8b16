"""Forward hooks that collect named intermediate outputs, so model code stays plain."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
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


@torch.no_grad()
def probe_features(model: nn.Module, paths: Iterable[str], input_shape: tuple[int, ...]
                   ) -> dict[str, Tensor]:
    """The output at each path for a zeros batch of two, run in eval mode so BatchNorm
    running statistics are left untouched (ValueError for an unknown path)."""
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with FeatureHooks(model, tuple(paths)) as feats:
            model(torch.zeros((2, *input_shape), device=device))
    finally:
        model.train(was_training)
    return feats


def feature_shapes(model: nn.Module, paths: Iterable[str], input_shape: tuple[int, ...]
                   ) -> dict[str, tuple[int, ...]]:
    """The output shape at each path, batch dimension dropped (:func:`probe_features`)."""
    return {p: tuple(f.shape[1:]) for p, f in probe_features(model, paths, input_shape).items()}


def pool_to_smaller(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average pool the larger of two (B, C, H, W) maps to the other's size."""
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    if tuple(student.shape[2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


def resolution_stages(model: nn.Module, input_shape: tuple[int, ...],
                      shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """The last stage at each spatial resolution, shallow to deep: the feature maps the CIFAR
    benchmarks tap (layer1..layer3 of the ResNets, WRNs and ShuffleNets; layer1..layer5 of
    the VGGs; layer2, layer3, layer5, layer7 of MobileNetV2; both blocks of the small CNN).
    Stages with other than (C, H, W) outputs are left out. ``shapes``: the stages' output
    shapes if already probed (:func:`feature_shapes`)."""
    stages = feature_stages(model)
    if shapes is None:
        shapes = feature_shapes(model, stages, input_shape) if stages else {}
    picked: list[str] = []
    for path in stages:
        shape = shapes[path]
        if len(shape) != 3:
            continue
        if picked and shapes[picked[-1]][1:] == shape[1:]:
            picked[-1] = path  # same resolution: keep the deeper stage
        else:
            picked.append(path)
    return picked


def require_feature_maps(model: nn.Module, method: str, who: str) -> None:
    """A one-line ConfigError unless ``model`` is convolutional and declares its stages
    (an MLP has no (B, C, H, W) feature maps)."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ConfigError(f"method {method} needs (B, C, H, W) feature maps, but the {who} "
                          f"{type(model).__name__} has no convolutional stages (use a CNN, "
                          "or a method on logits or the penultimate feature)")
    if not feature_stages(model):
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"method {method}: the {who} {type(model).__name__} declares no "
                          f"stages; give its layers by module path (top-level modules: {top})")
