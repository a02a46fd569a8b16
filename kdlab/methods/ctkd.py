"""Curriculum temperature for KD, CTKD (Li, Li, Yang, Zhang, Wang, Qiu, Jiang, Yang,
"Curriculum Temperature for Knowledge Distillation", AAAI 2023, arXiv 2211.16231), with the
global temperature of the authors' code:

    T      = t_min + t_range * sigmoid(theta)          (theta: one learnable scalar, init 1)
    L      = w_ce CE(s, y) + w_kd T^2 KL( softmax(t/T) || softmax(s/T) )
    lambda = (1 - cos(pi * min(e, E) / E)) / 2         e: training epoch counted from 1

theta is trained with the student's optimiser, but through a gradient-reversal layer of
strength lambda: the KD term's gradient reaches theta multiplied by -lambda, so the
temperature moves to *increase* the KD loss (an adversarial, easy-to-hard curriculum), more
strongly as lambda rises from 0 to 1 over the first E = 10 epochs. Both the softmax and the
T^2 factor use the learnable T. Defaults: t_min = 1, t_range = 20 (so T starts at
1 + 20 sigmoid(1) = 15.6), E = 10, w_ce = 0.1, w_kd = 0.9.

State: the parameter ``theta`` (in checkpoints and the optimiser, like the student's
weights) and the buffer ``reversal`` (lambda of the current epoch). With several teachers the
KD term is averaged over them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Method, Outputs, cross_entropy, kd_kl, require_teachers


class GradientReversal(torch.autograd.Function):
    """Identity forward; the gradient is multiplied by -strength on the way back."""

    @staticmethod
    def forward(ctx, x: Tensor, strength: Tensor) -> Tensor:
        ctx.save_for_backward(strength)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (strength,) = ctx.saved_tensors
        return -strength.to(grad.dtype) * grad, None


def reversal_strength(epoch: int, epochs: int) -> float:
    """lambda(e) = (1 - cos(pi min(e, E) / E)) / 2: 0 at e = 0, 1 from e = E on."""
    if epochs <= 0:
        return 1.0
    return (1.0 - math.cos(math.pi * min(max(epoch, 0), epochs) / epochs)) / 2.0


class CTKD(Method):
    name = "ctkd"
    description = "CTKD: KD with an adversarially learned temperature (reversed gradient)"

    def __init__(self, t_min: float = 1.0, t_range: float = 20.0, theta_init: float = 1.0,
                 curriculum_epochs: int = 10, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta_init))
        self.register_buffer("reversal", torch.tensor(0.0))
        self._final_theta: Tensor | None = None  # for results(), which sees the best checkpoint

    def on_train_epoch_start(self, ctx) -> None:
        self.reversal.fill_(reversal_strength(int(ctx.current_epoch) + 1,
                                              self.curriculum_epochs))

    def temperature(self) -> Tensor:
        """T = t_min + t_range * sigmoid(theta), with theta behind the gradient reversal."""
        theta = GradientReversal.apply(self.theta, self.reversal)
        return self.t_min + self.t_range * torch.sigmoid(theta)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        temperature = self.temperature().float()
        kl = sum(kd_kl(student.logits, t.logits, temperature) for t in teachers)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "kd": self.kd_weight * kl / len(teachers),
        }

    def on_train_batch_end(self, ctx, batch) -> None:
        self._final_theta = self.theta.detach().clone()  # no host sync
        ctx.log("ctkd/temperature", self.t_min + self.t_range
                * torch.sigmoid(self._final_theta), on_step=False, on_epoch=True)

    def results(self):
        theta = self._final_theta if self._final_theta is not None else self.theta.detach()
        t = self.t_min + self.t_range * torch.sigmoid(theta)
        return {"ctkd": {"temperature_final": float(t), "theta_final": float(theta)}}
