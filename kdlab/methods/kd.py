"""Knowledge distillation (Hinton, Vinyals, Dean 2015, "Distilling the knowledge in a
neural network", arXiv 1503.02531).

    L = w_ce * CE(s, y~) + w_kd * T^2 * KL( softmax(t / T) || softmax(s / T) )

KL summed over classes, averaged over the batch. CIFAR-100 defaults: T = 4, w_ce = 0.1,
w_kd = 0.9. With several teachers the KD term is taken against each one and averaged.
"""

from __future__ import annotations

from .base import Method, Outputs, cross_entropy, kd_kl, require_teachers


class KD(Method):
    name = "kd"
    description = "Hinton KD: CE on labels + T^2 KL to the teacher's softened distribution"

    def __init__(self, temperature: float = 4.0, ce_weight: float = 0.1, kd_weight: float = 0.9):
        super().__init__()
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.kd_weight = float(kd_weight)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        kl = sum(kd_kl(student.logits, t.logits, self.temperature) for t in teachers)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "kd": self.kd_weight * kl / len(teachers),
        }
