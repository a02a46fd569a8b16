"""Relational knowledge distillation, RKD (Park, Kim, Lu, Cho, "Relational Knowledge
Distillation", CVPR 2019, arXiv 1904.05068), on the penultimate features as in the CIFAR-100
benchmark of CRD (Tian et al. 2020):

    d(x)_ij     = |x_i - x_j|_2 / mean_{(k, l): d_kl > 0} |x_k - x_l|_2      (d_ii = 0)
    a(x)_ijk    = < (x_j - x_i) / |x_j - x_i|, (x_k - x_i) / |x_k - x_i| >   (0 where i = j, k)
    L_distance  = mean_{i,j} huber(d(h_s)_ij - d(h_t)_ij)
    L_angle     = mean_{i,j,k} huber(a(h_s)_ijk - a(h_t)_ijk)
    L           = w_ce CE(s, y) + w_d L_distance + w_a L_angle

huber = smooth L1 with threshold 1 (0.5 x^2 below 1, |x| - 0.5 above); h the penultimate
features (the classifier's input) of the batch. Defaults: w_d = 25, w_a = 50, w_ce = 1.
Squared distances are clamped at 1e-12 before the square root (so identical rows get
distance 1e-6), as in the benchmark's code; a batch whose distances are all 0 has a zero
distance term. Distances and angles are computed in float32 even under mixed precision.
One teacher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.features import PENULTIMATE
from .base import Method, Outputs, cross_entropy, require_teachers


def pairwise_distances(x: Tensor) -> Tensor:
    """(B, B) Euclidean distances, squared values clamped at 1e-12, zero diagonal."""
    squares = x.pow(2).sum(1)
    d2 = (squares[:, None] + squares[None, :] - 2.0 * x @ x.T).clamp_min(1e-12)
    off_diagonal = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    return d2.sqrt() * off_diagonal


def normalised_distances(x: Tensor) -> Tensor:
    """Distances divided by their mean over the positive entries."""
    d = pairwise_distances(x)
    positive = (d > 0).sum().clamp_min(1)
    return d / (d.sum() / positive).clamp_min(1e-12)


def triplet_angles(x: Tensor) -> Tensor:
    """(B, B, B): cosine of the angle at x_i between x_j and x_k."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], dim=2)  # [i, j] = unit(x_j - x_i)
    return directions @ directions.transpose(1, 2)


def rkd_losses(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(L_distance, L_angle) of two (B, D) feature batches, in float32."""
    with torch.autocast(student.device.type, enabled=False):
        s, t = student.float().flatten(1), teacher.float().flatten(1).detach()
        distance = F.smooth_l1_loss(normalised_distances(s), normalised_distances(t))
        angle = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
    return distance, angle


class RKD(Method):
    name = "rkd"
    description = "RKD: CE + Huber losses on distance and angle relations of penultimate features"
    student_features = (PENULTIMATE,)
    teacher_features = (PENULTIMATE,)

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0,
                 ce_weight: float = 1.0):
        super().__init__()

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        distance, angle = rkd_losses(student.features[PENULTIMATE],
                                     teachers[0].features[PENULTIMATE])
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "rkd_distance": self.distance_weight * distance,
            "rkd_angle": self.angle_weight * angle,
        }
