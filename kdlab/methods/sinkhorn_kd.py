"""Sinkhorn knowledge distillation (Cui, Qing, Zhang, Shen, Zhang, Zeng, "SinKD: Sinkhorn
Distance Minimization for Knowledge Distillation", LREC-COLING 2024, arXiv 2402.17110;
code 2018cx/SinKD, written for NLP).

KD plus a batch-level entropic optimal-transport term between the softened student and
teacher distributions. With p^T(z) = softmax(z / T) over the classes and a batch of B:

    P_s = p^T(s) (B x C),  P_t = p^T(t)
    W_ij = | P_s,i - P_t,j |_1                          (B x B cost: L1 between rows)
    K    = exp(-W / eps)
    Pi   = K after n rounds of (rows to sum 1, then columns to sum 1)      (Sinkhorn)
    L_sink = sum_ij Pi_ij W_ij

    L = w_ce * CE(s, y) + w_kd * KL( p^T(t) || p^T(s) ) + w_sink * L_sink

The gradient flows through both Pi and W (as in the released code). The normalisation is
done in the log domain (log K minus logsumexp over rows, then over columns), which equals
the released code's division of K while staying finite for any eps. Defaults, from the
released code: T = 2, eps = 0.1, 20 rounds, w_ce = 0.2 and w_kd = 0.8 (its ``alpha``: the
KD loss there is a soft cross-entropy without T^2, which has the gradient of this KL),
w_sink = 0.001 (the README's value; one version of its ``loss.py`` scales by
0.0008 * 20 / 8 = 0.002). Pi's total mass is B (every column sums to 1), so L_sink grows
with the batch size. Under DDP the transport is computed within each rank's batch. One
teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Method, Outputs, cross_entropy, kd_kl, require_teachers


def softened(logits: Tensor, temperature: float) -> Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.softmax(logits.to(dtype) / temperature, dim=-1)


def l1_cost(p_s: Tensor, p_t: Tensor) -> Tensor:
    """W_ij = sum_c |p_s,ic - p_t,jc|, shape (B, B)."""
    return torch.cdist(p_s, p_t, p=1)


def sinkhorn_plan(cost: Tensor, epsilon: float, iterations: int) -> Tensor:
    """Pi from K = exp(-cost / eps) after ``iterations`` rounds of row then column
    normalisation (log domain)."""
    log_k = -cost / epsilon
    for _ in range(iterations):
        log_k = log_k - torch.logsumexp(log_k, dim=1, keepdim=True)
        log_k = log_k - torch.logsumexp(log_k, dim=0, keepdim=True)
    return log_k.exp()


def sinkhorn_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
                  epsilon: float, iterations: int) -> Tensor:
    """sum_ij Pi_ij W_ij between the softened student and teacher distributions."""
    p_s = softened(student_logits, temperature)
    p_t = softened(teacher_logits.detach(), temperature).to(p_s.dtype)
    cost = l1_cost(p_s, p_t)
    return (sinkhorn_plan(cost, epsilon, iterations) * cost).sum()


class SinkhornKD(Method):
    name = "sinkhorn_kd"
    description = "Sinkhorn KD: CE + KD + a batch-level entropic OT distance (softened outputs)"

    def __init__(self, temperature: float = 2.0, ce_weight: float = 0.2, kd_weight: float = 0.8,
                 sinkhorn_weight: float = 0.001, epsilon: float = 0.1, iterations: int = 20):
        super().__init__()
        if temperature <= 0 or epsilon <= 0:
            raise ConfigError(f"method.temperature and method.epsilon must be > 0, got "
                              f"{temperature} and {epsilon}")
        if iterations < 1:
            raise ConfigError(f"method.iterations must be >= 1, got {iterations}")

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        s, t = student.logits, teachers[0].logits.detach()
        sink = sinkhorn_loss(s, t, self.temperature, self.epsilon, self.iterations)
        return {
            "ce": self.ce_weight * cross_entropy(s, batch["target"]),
            # the paper's KD term has no T^2 factor
            "kd": self.kd_weight * kd_kl(s, t, self.temperature) / self.temperature ** 2,
            "sinkhorn": self.sinkhorn_weight * sink,
        }
