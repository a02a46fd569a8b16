"""Dual-head knowledge distillation (Yang, Zong, Huang, Cai, Bai, "Dual-Head Knowledge
Distillation: Enhancing Logits Utilization with an Auxiliary Head", KDD 2025,
arXiv 2411.08937; code penghui-yang/DHKD).

The student's backbone feeds two linear heads on the pooled feature h (feature path
``penultimate``, the input of the student's own classifier): its classifier W1 (the main
head, the only one used at evaluation) is trained with CE on the labels; an auxiliary head
z = W2 h, a submodule of the method, is trained on the teacher's logits t with a binary KL:

    d_ic = (z_ic - t_ic) / T_b
    L = w_ce * CE(W1 h, y)
      + alpha * T_b^2 * mean_i sum_c KL( Bern(1/2) || Bern(sigmoid(d_ic)) )

and KL(Bern(1/2) || Bern(sigmoid(d))) = log cosh(d / 2), so the auxiliary term is
alpha * T_b^2 * mean_i sum_c log cosh((z_ic - t_ic) / (2 T_b)): a smooth, logit-matching
loss that is quadratic near z = t and linear far from it. Both terms reach the backbone.
Defaults (the authors' CIFAR-100 command): T_b = 2, alpha = 1, w_ce = 1. The released loss
(``BinaryKLNorm``) clamps sigmoid(d) to [1e-8, 1 - 1e-8], which caps each class's term at
about 9.2 T_b^2; the closed form here has no cap (they agree while |d| < ~18).

``head``: ``linear`` (W2 a Linear layer, as the paper describes) or ``mlp`` (the released
CIFAR command's ``--nonlinear`` head: Linear(d, 200), Dropout 0.1, BatchNorm, ReLU,
Linear(200, C)). The head is built in ``setup`` from the student's classifier width, joins
the optimiser (``extra_parameters``) and is saved in checkpoints.

**Gradient alignment** (``gradient_alignment=true``; the released ``--ga``, a PCGrad-style
projection): with g_ce and g_aux the gradients of the two weighted terms with respect to
every trainable parameter (student and head), when <g_aux, g_ce> < 0 the auxiliary gradient
is replaced by its projection g_aux - (<g_aux, g_ce> / |g_ce|^2) g_ce. The contract has one
backward pass of the summed terms, so the method carries it with an extra term whose
gradient is exactly that correction:

    align = -c * (w_ce CE),   c = min(<g_aux, g_ce>, 0) / |g_ce|^2   (a constant)

computed from two ``autograd.grad`` passes inside the training step (about 3 backward
passes per step instead of 1). Under DDP the projection uses each rank's local gradients.
One teacher.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.features import PENULTIMATE, find_classifier
from .base import Method, MethodContext, Outputs, cross_entropy, require_teachers

Head = Literal["linear", "mlp"]


def log_cosh(x: Tensor) -> Tensor:
    """log cosh(x), stable for large |x|: |x| + log(1 + exp(-2|x|)) - log 2."""
    a = x.abs()
    return a + F.softplus(-2.0 * a) - math.log(2.0)


def binary_kl_loss(aux_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T_b^2 * mean_i sum_c KL(Bern(1/2) || Bern(sigmoid((z - t) / T_b)))."""
    dtype = torch.float64 if aux_logits.dtype == torch.float64 else torch.float32
    d = (aux_logits.to(dtype) - teacher_logits.detach().to(dtype)) / temperature
    return temperature ** 2 * log_cosh(d / 2).sum(-1).mean()


def make_head(kind: Head, in_features: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Linear(in_features, 200), nn.Dropout(0.1), nn.BatchNorm1d(200),
                         nn.ReLU(inplace=True), nn.Linear(200, num_classes))


def alignment_coefficient(ce: Tensor, aux: Tensor, params: list[nn.Parameter]) -> Tensor:
    """c = min(<g_aux, g_ce>, 0) / |g_ce|^2 over ``params`` (0 when g_ce vanishes)."""
    g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
    g_aux = torch.autograd.grad(aux, params, retain_graph=True, allow_unused=True)
    dot = torch.zeros((), device=ce.device, dtype=torch.float64)
    norm = torch.zeros((), device=ce.device, dtype=torch.float64)
    for a, b in zip(g_ce, g_aux, strict=True):
        if a is None:
            continue
        norm = norm + a.double().pow(2).sum()
        if b is not None:
            dot = dot + (a.double() * b.double()).sum()
    if float(norm) == 0.0:
        return torch.zeros((), device=ce.device)
    return (dot.clamp_max(0.0) / norm).float()


class DHKD(Method):
    name = "dhkd"
    description = "Dual-head KD: CE on the main head + binary-KL (log-cosh) on an auxiliary head"
    student_features = (PENULTIMATE,)

    def __init__(self, alpha: float = 1.0, temperature: float = 2.0, ce_weight: float = 1.0,
                 head: Head = "linear", gradient_alignment: bool = False):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {temperature}")
        self.aux_head: nn.Module | None = None  # built in setup() from the student's width
        self.ctx: MethodContext | None = None  # the run, from setup()

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)
        try:
            find_classifier(student)
        except ValueError as e:
            raise ConfigError(f"dhkd needs a student with a linear classifier: {e}") from None

    def setup(self, ctx) -> None:
        self.ctx = ctx
        if self.aux_head is not None:  # idempotent: setup runs for every stage
            return
        self.check(ctx.student, ctx.teachers)
        _, classifier = find_classifier(ctx.student)
        device = classifier.weight.device
        self.aux_head = make_head(self.head, classifier.in_features,
                                  int(ctx.num_classes)).to(device)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        if self.aux_head is None:
            raise RuntimeError("dhkd's auxiliary head is not built: setup(ctx) must run first")
        aux_logits = self.aux_head(student.features[PENULTIMATE])
        ce = self.ce_weight * cross_entropy(student.logits, batch["target"])
        aux = self.alpha * binary_kl_loss(aux_logits, teachers[0].logits, self.temperature)
        terms = {"ce": ce, "aux": aux}
        if self.gradient_alignment and torch.is_grad_enabled() and ce.requires_grad:
            if self.ctx is None:
                raise RuntimeError("dhkd gradient alignment needs setup(ctx) first")
            params = [p for p in [*self.ctx.student.parameters(), *self.aux_head.parameters()]
                      if p.requires_grad]
            c = alignment_coefficient(ce, aux, params)
            terms["align"] = -c.detach() * ce
        return terms
