"""Multi-level logit distillation, MLKD (Jin, Wang, Lin, "Multi-Level Logit Distillation",
CVPR 2023).

The student matches the teacher's softened predictions at three levels, at several
temperatures, on a weak view (the usual crop + flip) and a strong view (RandAugment +
Cutout: ``input_views = ("strong",)``) of each batch. With p^T(z) = softmax(z / T) over the
batch (B x C matrices P_s, P_t):

    instance   I_T = T^2 KL( p^T(t_i) || p^T(s_i) )                 per example
    batch      B_T = || P_t P_t^T - P_s P_s^T ||_F^2 / B             B x B input correlation
    class      C_T = || P_t^T P_t - P_s^T P_s ||_F^2 / C             C x C class correlation

    L = w_ce (CE(s_weak, y) + CE(s_strong, y))
        + w_kd sum_{T in temperatures} [ mean_i m_i I_T,i(weak) + mean_i I_T,i(strong)
                                        + B_T(weak; rows m) + C_T(weak; classes c) ]

Defaults w_ce = 0.1, w_kd = 0.9, T in {2, 3, 4, 5, 6} (CIFAR-100). The masks come from the
teacher's weak-view predictions ("prediction augmentation"): m_i = 1 for examples whose
teacher confidence max_c p(t_i)_c is at most the batch median, c_k = 1 for classes whose
summed probability over the batch is at most the median over classes. This follows the
authors' released code (KD_ours.py), which uses exactly this combination of terms: instance
terms on both views, the batch and class correlations on the weak view only.

``masking``: ``per_example`` (default) applies the masks to the examples and classes, as
the paper describes (the masked batch correlation keeps the rows and columns of masked
examples, the class correlation those of masked classes); ``released`` reproduces the
released code, whose losses are already reduced to scalars when the mask is applied, so
that every masked term is only scaled by the kept fraction (about 1/2). Every term is
averaged over the teachers when there are several.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, MethodContext, Outputs, cross_entropy, kd_kl, require_teachers

Masking = Literal["per_example", "released"]


def softened(logits: Tensor, temperature: float) -> Tensor:
    return F.softmax(logits.float() / temperature, dim=-1)


def batch_correlation(student: Tensor, teacher: Tensor, temperature: float,
                      rows: Tensor | None = None) -> Tensor:
    """||P_t P_t^T - P_s P_s^T||^2 / B over the rows/columns of the examples in ``rows``."""
    ps, pt = softened(student, temperature), softened(teacher, temperature)
    diff = (pt @ pt.T - ps @ ps.T) ** 2
    if rows is not None:
        keep = rows.float()
        diff = diff * keep[:, None] * keep[None, :]
    return diff.sum() / student.shape[0]


def class_correlation(student: Tensor, teacher: Tensor, temperature: float,
                      classes: Tensor | None = None) -> Tensor:
    """||P_t^T P_t - P_s^T P_s||^2 / C over the rows/columns of the classes in ``classes``."""
    ps, pt = softened(student, temperature), softened(teacher, temperature)
    diff = (pt.T @ pt - ps.T @ ps) ** 2
    if classes is not None:
        keep = classes.float()
        diff = diff * keep[:, None] * keep[None, :]
    return diff.sum() / student.shape[1]


def confidence_masks(teacher_weak: Tensor) -> tuple[Tensor, Tensor]:
    """(examples, classes) at or below the median teacher confidence of the batch."""
    probs = F.softmax(teacher_weak.float(), dim=-1)
    confidence = probs.max(-1).values
    per_class = probs.sum(0)
    return (confidence <= confidence.quantile(0.5, interpolation="lower")
            if len(confidence) > 1 else torch.ones_like(confidence, dtype=torch.bool),
            per_class <= per_class.quantile(0.5, interpolation="lower"))


class MLKD(Method):
    name = "mlkd"
    description = ("MLKD: instance, batch and class-level logit alignment over several "
                   "temperatures, on a weak and a strong view")
    input_views = ("strong",)

    def __init__(self, temperatures: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0),
                 ce_weight: float = 0.1, kd_weight: float = 0.9,
                 masking: Masking = "per_example"):
        super().__init__()
        self.ctx: MethodContext | None = None  # the run, from on_fit_start()

    def on_fit_start(self, ctx) -> None:
        self.ctx = ctx  # the strong view's forward passes

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        ctx = self.ctx
        strong = batch["input_strong"]
        s_weak, s_strong = student.logits, ctx.student(strong)
        t_strong_all = [o.logits for o in ctx.teacher_outputs(strong)]
        y = batch["target"]
        terms = {"ce": self.ce_weight * (cross_entropy(s_weak, y) + cross_entropy(s_strong, y))}
        totals = {"kd": 0.0, "bc": 0.0, "cc": 0.0}
        for t_weak_out, t_strong in zip(teachers, t_strong_all, strict=True):
            t_weak = t_weak_out.logits
            examples, classes = confidence_masks(t_weak)
            for temp in self.temperatures:
                weak = kd_kl(s_weak, t_weak, temp, reduction="none")
                totals["kd"] = totals["kd"] + self._masked_mean(weak, examples) + kd_kl(
                    s_strong, t_strong, temp)
                if self.masking == "released":
                    totals["bc"] = totals["bc"] + batch_correlation(
                        s_weak, t_weak, temp) * examples.float().mean()
                    totals["cc"] = totals["cc"] + class_correlation(
                        s_weak, t_weak, temp) * classes.float().mean()
                else:
                    totals["bc"] = totals["bc"] + batch_correlation(s_weak, t_weak, temp,
                                                                    examples)
                    totals["cc"] = totals["cc"] + class_correlation(s_weak, t_weak, temp,
                                                                    classes)
        for name, total in totals.items():
            terms[name] = self.kd_weight * total / len(teachers)
        return terms

    def _masked_mean(self, values: Tensor, mask: Tensor) -> Tensor:
        if self.masking == "released":  # the scalar loss times the kept fraction
            return values.mean() * mask.float().mean()
        return (values * mask.float()).mean()
