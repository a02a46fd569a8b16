"""DIST (Huang, You, Wang, Qian, Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022, arXiv 2205.10536): match the *relations* of the softened predictions by Pearson
correlation instead of their values by KL.

    P_s = softmax(s / T), P_t = softmax(t / T)                     (B x C, row per example)
    rho(a, b)  = <a - mean(a), b - mean(b)> / (|a - mean(a)| |b - mean(b)| + 1e-8)
    inter      = 1 - mean_i rho(P_s[i, :], P_t[i, :])      inter-class relation (per example)
    intra      = 1 - mean_c rho(P_s[:, c], P_t[:, c])      intra-class relation (per class,
                                                           over the batch)
    L          = w_ce CE(s, y) + beta T^2 inter + gamma T^2 intra

Defaults (CIFAR-100): T = 4, beta = gamma = 2, w_ce = 1. A row or column with no spread
(one example in the batch, or a class with the same probability for every example) has
correlation 0, as the 1e-8 in the authors' denominator gives. With several teachers each
term is averaged over them.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import Method, Outputs, cross_entropy, require_teachers

EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each row of a with the same row of b: shape (rows,)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def inter_class_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    """1 - mean over examples of the correlation of their class distributions."""
    return 1.0 - pearson_rows(p_s, p_t).mean()


def intra_class_relation(p_s: Tensor, p_t: Tensor) -> Tensor:
    """1 - mean over classes of the correlation of their probabilities across the batch."""
    return 1.0 - pearson_rows(p_s.T, p_t.T).mean()


def softened(logits: Tensor, temperature: float) -> Tensor:
    return F.softmax(logits.float() / temperature, dim=1)


class DIST(Method):
    name = "dist"
    description = "DIST: CE + inter- and intra-class Pearson correlation of predictions"

    def __init__(self, temperature: float = 4.0, beta: float = 2.0, gamma: float = 2.0,
                 ce_weight: float = 1.0):
        super().__init__()

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        t2 = self.temperature**2
        p_s = softened(student.logits, self.temperature)
        inter = intra = 0.0
        for teacher in teachers:
            p_t = softened(teacher.logits, self.temperature)
            inter = inter + inter_class_relation(p_s, p_t)
            intra = intra + intra_class_relation(p_s, p_t)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "dist_inter": self.beta * t2 * inter / len(teachers),
            "dist_intra": self.gamma * t2 * intra / len(teachers),
        }
