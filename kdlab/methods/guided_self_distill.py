"""Self-distillation with ground-truth guidance (Borup, Andersen, "Even your Teacher Needs
Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation",
NeurIPS 2021, arXiv 2102.13088; code Kennethborup/self_distillation).

Generations of self-distillation: at generation k the teacher is the frozen generation-(k-1)
student of the same architecture, and the student is trained afresh with a mix of the
ground-truth and the teacher's prediction, both matched in squared error of probabilities:

    L = alpha * MSE( softmax(s), onehot(y) ) + (1 - alpha) * MSE( softmax(s), softmax(t) )

MSE = mean over the batch *and* the classes (``F.mse_loss``'s mean, as in the released
code). alpha = 0.6 (the ground-truth weight of the released command); alpha = 0 is
self-distillation without guidance (Mobahi et al. 2020). The chain itself is the run's
``generations=N`` (``conf/experiment/digits_guided_self_distill.yaml``: 5 generations,
teacher = the student's architecture, Adam as in the released code: with SGD at the digits
recipe's lr the probability MSE, whose gradients are far smaller than CE's, barely trains).
Differences from the released code, which trains generation 0 with MSE to the labels alone
and adds an L2 penalty on the parameter norms (1e-4 * sum of norms): kdlab's first teacher is
trained with CE on the dataset's recipe (``teacher.ckpt=auto``), and regularisation is the
optimiser's weight decay. The paper's estimate of the optimal alpha is not implemented. One teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Method, Outputs, require_teachers


def probabilities(logits: Tensor) -> Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.softmax(logits.to(dtype), dim=-1)


def label_mse(student_logits: Tensor, target: Tensor) -> Tensor:
    """mean_{i,c} (softmax(s)_ic - onehot(y)_ic)^2."""
    p = probabilities(student_logits)
    return F.mse_loss(p, F.one_hot(target, p.shape[-1]).to(p.dtype))


def teacher_mse(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean_{i,c} (softmax(s)_ic - softmax(t)_ic)^2."""
    p = probabilities(student_logits)
    return F.mse_loss(p, probabilities(teacher_logits.detach()).to(p.dtype))


class GuidedSelfDistill(Method):
    name = "guided_self_distill"
    description = ("Guided self-distillation: alpha MSE to the labels + (1 - alpha) MSE to the "
                   "previous generation (generations=N)")

    def __init__(self, alpha: float = 0.6):
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"method.alpha must be in [0, 1], got {alpha}")

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        s = student.logits
        return {
            "label_mse": self.alpha * label_mse(s, batch["target"]),
            "teacher_mse": (1 - self.alpha) * teacher_mse(s, teachers[0].logits),
        }
