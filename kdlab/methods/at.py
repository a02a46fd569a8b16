"""Attention transfer, AT (Zagoruyko & Komodakis, "Paying More Attention to Attention:
Improving the Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017,
arXiv 1612.03928), in the form of the CIFAR-100 benchmark of CRD (Tian et al. 2020):

    a(f)   = q / ||q||_2,   q = vec( mean_c f_c^2 )        spatial attention of a (C, H, W) map
    AT_j   = mean_{i, k} ( a(f_s,ij)_k - a(f_t,ij)_k )^2    over examples i and positions k
    L      = w_ce * CE(s, y) + beta * sum_j AT_j

j runs over matched pairs of stage outputs (student_layers[j], teacher_layers[j]); when the
two maps of a pair differ in size, the larger feature map is adaptive-average pooled to the
smaller one before its attention is taken. beta = 1000, w_ce = 1.

Layers (``auto``): the last stage at each spatial resolution, at most ``max_stages`` (4) of
the deepest -- layer1..layer3 of the ResNets, WRNs and ShuffleNets, layer2..layer5 of the
VGGs, layer2/3/5/7 of MobileNetV2 (the maps the CRD benchmark code taps), both blocks of the
small CNN; when student and teacher have different counts, the deepest min(n_s, n_t) of
each. Explicit module paths (two lists of equal length) override it. Attention maps need
(B, C, H, W) features: models without convolutional stages (MLPs) are refused. One teacher.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from ..models.features import (
    feature_shapes,
    feature_stages,
    pool_to_smaller,
    require_feature_maps,
    resolution_stages,
)
from .base import Method, Outputs, cross_entropy, require_teachers


def attention_map(feature: Tensor, p: float = 2.0) -> Tensor:
    """a(f): the channel mean of |f|^p per position, flattened, L2-normalised per example."""
    q = feature.float().abs().pow(p).mean(1).flatten(1)
    return F.normalize(q, dim=1)


def attention_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """AT_j: mean squared difference of the two attention maps (after pooling to one size)."""
    student, teacher = pool_to_smaller(student.float(), teacher.float())
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


def as_paths(layers: str | list[str]) -> list[str] | None:
    """``auto`` -> None (resolved in setup), else the list of module paths."""
    if isinstance(layers, str):
        return None if layers == "auto" else [layers]
    return list(layers)


def probe_layers(model, fixed: list[str] | None, input_shape, extra: tuple[str, ...] = ()
                 ) -> dict[str, tuple[int, ...]]:
    """One zeros-batch probe: output shapes of the model's stages (or its explicit layers)
    and of ``extra`` paths."""
    paths = fixed if fixed is not None else feature_stages(model)
    return feature_shapes(model, list(dict.fromkeys([*paths, *extra])), input_shape)


def matched_stages(shapes: dict[str, dict[str, tuple[int, ...]]], models: dict[str, object],
                   input_shape, max_stages: int, fixed: dict[str, list[str] | None]
                   ) -> dict[str, list[str]]:
    """The paired layer lists: explicit ones as given (each must give (C, H, W) maps),
    ``auto`` ones from :func:`resolution_stages`, each trimmed to the deepest common count
    (at most ``max_stages``). ``shapes``: :func:`probe_layers` of each model."""
    lists = {}
    for who, model in models.items():
        if fixed[who] is None:
            lists[who] = resolution_stages(model, input_shape, shapes[who])
            continue
        for path in fixed[who]:
            if len(shapes[who][path]) != 3:
                dims = ", ".join(map(str, shapes[who][path]))
                raise ConfigError(f"method.{who}_layers: a (B, C, H, W) feature map is needed; "
                                  f"layer {path!r} gives (B, {dims})")
        lists[who] = fixed[who]
    count = min(len(lists["student"]), len(lists["teacher"]), max_stages)
    if count == 0:
        raise ConfigError("no (B, C, H, W) stage outputs to match between student and teacher")
    return {who: paths[len(paths) - count:] for who, paths in lists.items()}


def check_layer_lists(method: str, student, teacher, fixed: dict[str, list[str] | None]
                      ) -> None:
    """Explicit paths must exist and pair up; ``auto`` needs a convolutional model."""
    for who, model in (("student", student), ("teacher", teacher)):
        paths = fixed[who]
        if paths is None:
            require_feature_maps(model, method, who)
            continue
        modules = dict(model.named_modules())
        for path in paths:
            if path not in modules:
                top = ", ".join(n for n, _ in model.named_children())
                raise ConfigError(f"method.{who}_layers: no module {path!r} in "
                                  f"{type(model).__name__} (top-level modules: {top})")
    if fixed["student"] is not None and fixed["teacher"] is not None \
            and len(fixed["student"]) != len(fixed["teacher"]):
        raise ConfigError(f"method {method}: student_layers and teacher_layers must pair up, "
                          f"got {len(fixed['student'])} and {len(fixed['teacher'])} paths")


class AT(Method):
    name = "at"
    description = "Attention transfer: CE + beta * MSE of normalised attention maps per stage"

    def __init__(self, student_layers: str | list[str] = "auto",
                 teacher_layers: str | list[str] = "auto", beta: float = 1000.0,
                 ce_weight: float = 1.0, p: float = 2.0, max_stages: int = 4):
        super().__init__()
        self.fixed = {"student": as_paths(student_layers), "teacher": as_paths(teacher_layers)}
        self.layers: dict[str, list[str]] | None = None  # resolved in setup()

    @property
    def student_features(self) -> tuple[str, ...]:
        return tuple(self.layers["student"]) if self.layers else ()

    @property
    def teacher_features(self) -> tuple[str, ...]:
        return tuple(self.layers["teacher"]) if self.layers else ()

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)
        check_layer_lists(self.name, student, teachers[0], self.fixed)

    def setup(self, ctx) -> None:
        if self.layers is not None:  # idempotent: setup runs for every stage
            return
        self.check(ctx.student, ctx.teachers)
        shape = tuple(ctx.input_shape)
        models = {"student": ctx.student, "teacher": ctx.teachers[0]}
        shapes = {who: probe_layers(m, self.fixed[who], shape) for who, m in models.items()}
        self.layers = matched_stages(shapes, models, shape, self.max_stages, self.fixed)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        if self.layers is None:
            raise RuntimeError("at layers are not resolved: setup(ctx) must run first")
        pairs = zip(self.layers["student"], self.layers["teacher"], strict=True)
        at = sum(attention_loss(student.features[s], teachers[0].features[t], self.p)
                 for s, t in pairs)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "at": self.beta * at,
        }
