"""Multi-teacher knowledge distillation: KD against the mean of the teachers' softened
distributions (the averaged-soft-target baseline; Hinton, Vinyals, Dean 2015 already
distil from an ensemble this way; also the multi-teacher baseline of ALM-KD).

    q = (1 / M) * sum_m softmax(t_m / T)
    L = w_ce * CE(s, y~) + w_kd * T^2 * KL( q || softmax(s / T) )

KL summed over classes, averaged over the batch. Defaults as KD: T = 4, w_ce = 0.1,
w_kd = 0.9. With one teacher this is exactly KD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Outputs, cross_entropy, require_teachers
from .kd import KD


def mean_teacher_probs(teacher_logits: list[Tensor], temperature: float) -> Tensor:
    """q = mean over teachers of softmax(t_m / T)."""
    return torch.stack([F.softmax(t.float() / temperature, dim=-1)
                        for t in teacher_logits]).mean(0)


def kl_to_probs(student_logits: Tensor, target_probs: Tensor, temperature: float) -> Tensor:
    """T^2 * KL(q || softmax(s / T)), summed over classes, averaged over the batch."""
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (torch.special.xlogy(target_probs, target_probs) - target_probs * log_p).sum(-1)
    return kl.mean() * temperature**2


class MultiTeacherKD(KD):
    """KD's weights and temperature; only the teacher target differs."""

    name = "multi_teacher_kd"
    description = "multi-teacher KD: CE + T^2 KL to the mean of the teachers' softened outputs"

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(teachers, self.name)
        q = mean_teacher_probs([t.logits for t in teachers], self.temperature)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "kd": self.kd_weight * kl_to_probs(student.logits, q, self.temperature),
        }
