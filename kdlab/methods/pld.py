"""Plackett-Luce distillation, PLD (arXiv 2506.12542, 2025).

The teacher defines a ranking of the classes: pi* puts the true label first, then the
other classes by descending teacher logit. The student's logits s are scored by the
Plackett-Luce likelihood of that ranking, each position weighted by the teacher's
confidence in the class ranked there:

    a_k = softmax(t / tau)_{pi*_k}
    L   = mean_i  sum_{k=1..C} a_k * [ logsumexp_{l >= k} s_{pi*_l} - s_{pi*_k} ]

No separate cross-entropy term: position 1 (the label) already is a weighted CE. tau = 4 on
CIFAR in the paper (1 on ImageNet). Vectorised: one sort, then the tail logsumexps as a
reversed cumulative logsumexp. With several teachers the loss is averaged over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, Outputs, require_teachers


def teacher_ranking(teacher_logits: Tensor, target: Tensor) -> Tensor:
    """pi*: per row, the label first, then the other classes by descending teacher logit."""
    key = teacher_logits.float().scatter(1, target[:, None], float("inf"))
    return torch.sort(key, dim=1, descending=True, stable=True).indices


def pld_loss(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
             temperature: float) -> Tensor:
    ranking = teacher_ranking(teacher_logits, target)
    s = student_logits.float().gather(1, ranking)
    weights = F.softmax(teacher_logits.float() / temperature, dim=-1).gather(1, ranking)
    tail_logsumexp = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # logsumexp_{l >= k} s_l
    return (weights * (tail_logsumexp - s)).sum(-1).mean()


class PLD(Method):
    name = "pld"
    description = "Plackett-Luce KD: teacher-weighted listwise loss on the label-first ranking"

    def __init__(self, temperature: float = 4.0, weight: float = 1.0):
        super().__init__()

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        y = batch["target"]
        loss = sum(pld_loss(student.logits, t.logits, y, self.temperature) for t in teachers)
        return {"pld": self.weight * loss / len(teachers)}
