"""FitNets: hints for thin deep nets (Romero, Ballas, Kahou, Chassang, Gatta, Bengio,
ICLR 2015, arXiv 1412.6550), in the one-stage form of the common CIFAR-100 recipe (CRD):

    L = w_ce * CE(s, y) + beta * MSE( r(f_s), f_t )

f_s is the student's output at the guided layer (``student_layer``), f_t the teacher's at
the hint layer (``teacher_layer``), both taken with forward hooks by module path (``auto``:
each model's middle stage -- ``layer2`` of the 3-stage CIFAR families as in the common
recipe, ``layer3`` of the 5-stage VGGs, the first block of the small CNN). MSE is the mean
over all elements; beta = 100 at the middle stage. One teacher.

The regressor r
---------------
Learnable, built in ``setup`` by probing both models with one zeros batch of the dataset's
input shape, and trained with the student (its parameters join the optimiser). For 4-d
features (B, C, H, W) it is the CRD code's ``ConvReg`` (HobbitLong/RepDistiller
``models/util.py``): a convolution from the student's C_s channels to the teacher's C_t
that also resamples the student's H_s x W_s map to the teacher's H_t x W_t, then BatchNorm,
then a ReLU:

    H_s = 2 H_t:      3x3 convolution, stride 2, padding 1
    2 H_s = H_t:      4x4 transposed convolution, stride 2, padding 1
    H_s >= H_t:       (1 + H_s - H_t) x (1 + W_s - W_t) convolution, no padding (1x1 when
                      the sizes agree: the paper's rule N_g - k + 1 = N_h)
    otherwise:        (kdlab's fallback, e.g. MobileNetV2's 4x4 stage against a 16x16
                      hint) the teacher's map is average-pooled to the student's size,
                      then a 1x1 convolution

r(f) = ReLU(BN(conv(f))) with ``regressor_relu: true`` (the default: the CRD code calls
``ConvReg(s_shape, t_shape)`` with its default ``use_relu=True`` in ``train_student.py``,
and the FitNets authors' own code gives the regressor the hint layer's non-linearity; the
paper: the regressor's output and the hint must be comparable, the same non-linearity);
``false`` drops the ReLU, so r can also reach the negative values of a pre-activation hint
(the WRN stage outputs; the CRD code's ReLU cannot). ``spatial: pool`` replaces the learned
resampling by kdlab's earlier choice: the larger map average-pooled to the smaller, then a
1x1 convolution. The convolution has a bias, as ``ConvReg``'s, which BatchNorm in training
mode cancels exactly. For 2-d features (B, C) r is a Linear layer (then the ReLU); a 4-d
feature facing a 2-d one is global-average pooled first.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.features import middle_stage, pool_to_smaller, probe_features
from .base import Method, Outputs, cross_entropy, require_teachers

Spatial = Literal["conv", "pool"]


def align_features(student: Tensor, teacher: Tensor, pool_maps: bool = True
                   ) -> tuple[Tensor, Tensor]:
    """The two features as the regressor takes them: a 4-d one facing a 2-d one is global-
    average pooled; two 4-d maps are pooled to the smaller size if ``pool_maps`` (else the
    regressor resamples the student's map itself)."""
    for f, who in ((student, "student"), (teacher, "teacher")):
        if f.dim() not in (2, 4):
            raise ConfigError(f"fitnet supports (B, C) or (B, C, H, W) features; the {who} "
                              f"layer gives shape {tuple(f.shape)}")
    if student.dim() == 4 and teacher.dim() == 2:
        return student.mean((2, 3)), teacher
    if student.dim() == 2 and teacher.dim() == 4:
        return student, teacher.mean((2, 3))
    if student.dim() == 4 and pool_maps:
        return pool_to_smaller(student, teacher)
    return student, teacher


def resampling_conv(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]
                    ) -> nn.Module | None:
    """ConvReg's convolution from a (C_s, H_s, W_s) map to a (C_t, H_t, W_t) one (the cases
    in the module docstring); None when the student's map is smaller, and not by half."""
    (c_s, h_s, w_s), (c_t, h_t, w_t) = student_shape, teacher_shape
    if (h_s, w_s) == (2 * h_t, 2 * w_t):
        return nn.Conv2d(c_s, c_t, kernel_size=3, stride=2, padding=1)
    if (2 * h_s, 2 * w_s) == (h_t, w_t):
        return nn.ConvTranspose2d(c_s, c_t, kernel_size=4, stride=2, padding=1)
    if h_s >= h_t and w_s >= w_t:
        return nn.Conv2d(c_s, c_t, kernel_size=(1 + h_s - h_t, 1 + w_s - w_t))
    return None


def make_regressor(student: Tensor, teacher: Tensor, relu: bool = True,
                   spatial: Spatial = "conv") -> tuple[nn.Module, bool]:
    """(r, pool_maps) for these probed features: the regressor, and whether the two maps are
    pooled to a common size before it (:func:`align_features`)."""
    if student.dim() == 4 and teacher.dim() == 4:
        conv = resampling_conv(tuple(student.shape[1:]), tuple(teacher.shape[1:])) \
            if spatial == "conv" else None
        pool_maps = conv is None
        if pool_maps:
            student, teacher = pool_to_smaller(student, teacher)
            conv = nn.Conv2d(student.shape[1], teacher.shape[1], kernel_size=1)
        layers = [conv, nn.BatchNorm2d(teacher.shape[1])]
    else:
        pool_maps = True
        student, teacher = align_features(student, teacher)
        layers = [nn.Linear(student.shape[1], teacher.shape[1])]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers), pool_maps


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
                 beta: float = 100.0, ce_weight: float = 1.0, regressor_relu: bool = True,
                 spatial: Spatial = "conv"):
        super().__init__()
        self.regressor: nn.Module | None = None  # built in setup() from the feature shapes
        self.pool_maps = True                    # decided with the regressor

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
            key = f"{who}_layer"
            if getattr(self, key) == "auto":
                setattr(self, key, middle_stage(model, f"method.{key}"))
            path = getattr(self, key)
            if path not in dict(model.named_modules()):
                top = ", ".join(n for n, _ in model.named_children())
                raise ConfigError(f"method.{key}={path!r}: no module at that path in "
                                  f"{type(model).__name__} (top-level modules: {top})")

    def setup(self, ctx) -> None:
        if self.regressor is not None:  # idempotent: setup runs for every stage
            return
        self.check(ctx.student, ctx.teachers)
        shape = tuple(ctx.input_shape)
        f_s = probe_feature(ctx.student, self.student_layer, shape, "method.student_layer")
        f_t = probe_feature(ctx.teachers[0], self.teacher_layer, shape, "method.teacher_layer")
        device = next(ctx.student.parameters()).device
        regressor, self.pool_maps = make_regressor(f_s, f_t, self.regressor_relu, self.spatial)
        self.regressor = regressor.to(device)

    def hint_loss(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        f_s, f_t = align_features(student_feature, teacher_feature, self.pool_maps)
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
