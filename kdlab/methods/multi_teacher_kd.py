"""Multi-teacher knowledge distillation: KD against the mean of the teachers' softened
distributions (the averaged-soft-target baseline; Hinton, Vinyals, Dean 2015 already
distil from an ensemble this way; also the multi-teacher baseline of ALM-KD).

    q = (1 / M) * sum_m softmax(t_m / T)
    L = w_ce * CE(s, y~) + w_kd * T^2 * KL( q || softmax(s / T) )

KL summed over classes, averaged over the batch. Defaults as KD: T = 4, w_ce = 0.1,
w_kd = 0.9. With one teacher this is exactly KD.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Outputs, cross_entropy, kl_divergence, require_teachers
from .kd import KD


def mean_teacher_log_probs(teacher_logits: list[Tensor], temperature: float) -> Tensor:
    """log q, q = mean over teachers of softmax(t_m / T) (a log-sum-exp: finite)."""
    logs = torch.stack([F.log_softmax(t.float() / temperature, dim=-1) for t in teacher_logits])
    return torch.logsumexp(logs, dim=0) - math.log(len(teacher_logits))


class MultiTeacherKD(KD):
    """KD's weights and temperature; only the teacher target differs."""

    name = "multi_teacher_kd"
    description = "multi-teacher KD: CE + T^2 KL to the mean of the teachers' softened outputs"

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        t = self.temperature
        log_q = mean_teacher_log_probs([o.logits for o in teachers], t)
        log_p = F.log_softmax(student.logits.float() / t, dim=-1)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "kd": self.kd_weight * t * t * kl_divergence(log_q, log_p).mean(),
        }
