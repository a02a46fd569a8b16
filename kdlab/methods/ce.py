"""Cross-entropy on the (possibly noisy) labels: the no-teacher baseline and teacher training.

    L = mean_i CE(s_i, y~_i)
"""

from __future__ import annotations

from .base import Method, Outputs, cross_entropy


class CE(Method):
    name = "ce"
    description = "cross-entropy on the labels only (baseline, teacher training)"
    needs_teacher = False

    def __init__(self, weight: float = 1.0):
        super().__init__()

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        return {"ce": self.weight * cross_entropy(student.logits, batch["target"])}
