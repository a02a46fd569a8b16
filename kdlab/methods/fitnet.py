"""FitNets: hints for thin deep nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio,
ICLR 2015, arXiv 1412.6550), in the one-stage form of the common CIFAR-100 recipe (CRD):

    L = w_ce * CE(s, y) + beta * MSE( r(f_s), f_t )

f_s is the student's output at the guided layer (``student_layer``), f_t the teacher's at
the hint layer (``teacher_layer``), both taken with forward hooks by module path (``auto``:
each model's middle stage -- ``layer2`` of the 3-stage CIFAR families as in the common
recipe, ``layer3`` of the 5-stage VGGs, the first block of the small CNN); r is a
learnable regressor -- a 1x1 convolution + BatchNorm for 4-d features (B, C, H, W), a Linear
layer for 2-d features (B, C) -- built in ``setup`` by probing both models with one zeros
batch of the dataset's input shape, and trained with the student (its parameters join the
optimiser). MSE is the mean over all elements. beta = 100 at the middle stage. When the
feature maps differ in size, the larger one is adaptive-average pooled to the smaller; a 4-d
feature facing a 2-d one is global-average pooled. One teacher.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.features import middle_stage, pool_to_smaller, probe_features
from .base import Method, Outputs, cross_entropy, require_teachers


def align_features(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Pool the two features to a common spatial layout (the smaller of the two)."""
    for f, who in ((student, "student"), (teacher, "teacher")):
        if f.dim() not in (2, 4):
            raise ConfigError(f"fitnet supports (B, C) or (B, C, H, W) features; the {who} "
                              f"layer gives shape {tuple(f.shape)}")
    if student.dim() == 4 and teacher.dim() == 2:
        return student.mean((2, 3)), teacher
    if student.dim() == 2 and teacher.dim() == 4:
        return student, teacher.mean((2, 3))
    if student.dim() == 4:
        return pool_to_smaller(student, teacher)
    return student, teacher


def make_regressor(student: Tensor, teacher: Tensor) -> nn.Module:
    """Maps aligned student features to the teacher's channels."""
    if student.dim() == 4:
        return nn.Sequential(nn.Conv2d(student.shape[1], teacher.shape[1], 1, bias=False),
                             nn.BatchNorm2d(teacher.shape[1]))
    return nn.Linear(student.shape[1], teacher.shape[1])


def probe_feature(model: nn.Module, path: str, input_shape: tuple[int, ...],
                  option: str = "layer") -> Tensor:
    """The output of ``model``'s module at ``path`` for a zeros batch of two, in eval mode
    (:func:`probe_features`); an unknown path names the option to fix."""
    try:
        return probe_features(model, (path,), input_shape)[path].float()
    except ValueError as e:
        raise ConfigError(f"{option}={path!r}: {e}") from None


class FitNet(Method):
    name = "fitnet"
    description = "FitNet: CE + beta * MSE(regressor(student guided layer), teacher hint layer)"

    def __init__(self, student_layer: str = "auto", teacher_layer: str = "auto",
                 beta: float = 100.0, ce_weight: float = 1.0):
        super().__init__()
        self.layers = {"student": str(student_layer), "teacher": str(teacher_layer)}
        self.beta = float(beta)
        self.ce_weight = float(ce_weight)
        self.regressor: nn.Module | None = None  # built in setup() from the feature shapes

    @property
    def student_layer(self) -> str:
        return self.layers["student"]

    @property
    def teacher_layer(self) -> str:
        return self.layers["teacher"]

    @property
    def student_features(self) -> tuple[str, ...]:
        return (self.student_layer,)

    @property
    def teacher_features(self) -> tuple[str, ...]:
        return (self.teacher_layer,)

    def check(self, student, teachers) -> None:
        """Resolves ``auto`` to each model's middle stage; every path must exist."""
        require_teachers(self.name, len(teachers), exactly=1)
        for who, model in (("student", student), ("teacher", teachers[0])):
            option = f"method.{who}_layer"
            if self.layers[who] == "auto":
                self.layers[who] = middle_stage(model, option)
            path = self.layers[who]
            if path not in dict(model.named_modules()):
                top = ", ".join(n for n, _ in model.named_children())
                raise ConfigError(f"{option}={path!r}: no module at that path in "
                                  f"{type(model).__name__} (top-level modules: {top})")

    def setup(self, ctx) -> None:
        if self.regressor is not None:  # idempotent: setup runs for every stage
            return
        self.check(ctx.student, ctx.teachers)
        shape = tuple(ctx.input_shape)
        f_s = probe_feature(ctx.student, self.student_layer, shape, "method.student_layer")
        f_t = probe_feature(ctx.teachers[0], self.teacher_layer, shape, "method.teacher_layer")
        f_s, f_t = align_features(f_s, f_t)
        device = next(ctx.student.parameters()).device
        self.regressor = make_regressor(f_s, f_t).to(device)

    def hint_loss(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        f_s, f_t = align_features(student_feature, teacher_feature)
        return F.mse_loss(self.regressor(f_s).float(), f_t.float())

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        if self.regressor is None:
            raise RuntimeError("fitnet regressor is not built: setup(ctx) must run first")
        hint = self.hint_loss(student.features[self.student_layer],
                              teachers[0].features[self.teacher_layer])
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "hint": self.beta * hint,
        }
