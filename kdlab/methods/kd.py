"""Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the knowledge in a
neural network", arXiv 1503.02531).

    L = w_ce * CE(s, y~) + w_kd * T^2 * KL( softmax(t / T) || softmax(s / T) )

KL summed over classes, averaged over the batch. CIFAR-100 defaults: T = 4, w_ce = 0.1,
w_kd = 0.9. With several teachers the KD term is taken against each one and averaged.

Option ``logit_standardization`` (Sun, Ren, Li, Wang, Cao, "Logit Standardization in
Knowledge Distillation", CVPR 2024, arXiv 2403.01427): both logit vectors are z-scored per
example before the temperature softmax (the CE keeps the raw logits),

    Z(z) = (z - mean_c z_c) / (std_c z + 1e-7)      std with Bessel's correction (C - 1),

    L = w_ce * CE(s, y~) + w_kd * T^2 * KL( softmax(Z(t) / T) || softmax(Z(s) / T) )

with the paper's CIFAR-100 setting T = 2, w_ce = 0.1, w_kd = 9 (``conf/method/kd_ls.yaml``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Method, Outputs, cross_entropy, kd_kl, require_teachers

LS_EPS = 1e-7


def standardize_logits(logits: Tensor) -> Tensor:
    """Z-score each row: (z - mean) / (std + 1e-7), std with Bessel's correction, as the
    authors' code (torch.std). float64 stays float64, anything else becomes float32."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + LS_EPS)


class KD(Method):
    name = "kd"
    description = "Hinton KD: CE on labels + T^2 KL to the teacher's softened distribution"

    @classmethod
    def describe(cls, config) -> str:
        if cls.setting(config, "logit_standardization"):
            return ("KD with logit standardization (Sun et al. CVPR 2024): CE + T^2 KL "
                    "between the softened z-scored logits")
        return cls.description

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 logit_standardization: bool = False):
        super().__init__()

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        prepare = standardize_logits if self.logit_standardization else (lambda z: z)
        s = prepare(student.logits)
        kl = sum(kd_kl(s, prepare(t.logits), self.temperature) for t in teachers)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "kd": self.kd_weight * kl / len(teachers),
        }
