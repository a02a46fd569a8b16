"""Decoupled knowledge distillation (Zhao, Cui, Song, Qiu, Liang, "Decoupled Knowledge
Distillation", CVPR 2022, arXiv 2203.08679).

KD's KL is split into a target-class part and a non-target part that are weighted freely.
With p = softmax(s / T), q = softmax(t / T) and the label y:

    b(p)  = (p_y, 1 - p_y)                          binary masses: target vs. all the rest
    p^    = softmax over the classes c != y of s_c / T      (target class removed)
    TCKD  = T^2 * KL( b(q) || b(p) )
    NCKD  = T^2 * KL( q^ || p^ )
    L     = w_ce * CE(s, y) + min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)

Both KLs are averaged over the batch. Defaults (CIFAR-100): T = 4, alpha = 1, beta = 8,
warm-up 20 epochs; the paper uses beta = 6 for wrn_40_2 and vgg13 teachers and beta = 2 for
resnet56 -> resnet20 and resnet110 -> resnet32 (the CIFAR-100 experiment configs set it).

Option ``logit_standardization`` (Sun et al., CVPR 2024, arXiv 2403.01427): student and
teacher logits are z-scored per example (:func:`kdlab.methods.kd.standardize_logits`) before
both KLs (the CE keeps the raw logits); the paper's CIFAR-100 setting is T = 2 with alpha and
beta nine times DKD's (``conf/method/dkd_ls.yaml``).

``epoch`` counts from 1 (the first training epoch has warm-up factor 1 / warmup, as in the
authors' training loop). It is a buffer set at every epoch start, so it is saved in and
restored from checkpoints. With several teachers each term is averaged over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, Outputs, cross_entropy, kl_divergence, linear_warmup, require_teachers
from .kd import standardize_logits


def binary_log_masses(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """log (p_y, 1 - p_y) for p = softmax(logits / T): shape (B, 2).

    With d = logsumexp_{c != y} z_c - z_y: log p_y = -softplus(d), log(1 - p_y) =
    -softplus(-d); accurate in float32 even when one of the two masses is tiny.
    """
    z = logits.float() / temperature
    is_target = F.one_hot(target, z.shape[-1]).bool()
    rest = torch.logsumexp(z.masked_fill(is_target, float("-inf")), dim=-1)
    d = rest - z.gather(1, target[:, None]).squeeze(1)
    return torch.stack([-F.softplus(d), -F.softplus(-d)], dim=-1)


def non_target_log_probs(logits: Tensor, target: Tensor, temperature: float) -> Tensor:
    """log softmax of logits / T over the non-target classes only: shape (B, C - 1)."""
    z = logits.float() / temperature
    keep = ~F.one_hot(target, z.shape[-1]).bool()
    return F.log_softmax(z[keep].view(z.shape[0], -1), dim=-1)


def tckd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
         temperature: float) -> Tensor:
    """Target-class KD: T^2 KL over the binary (target, non-target) masses."""
    kl = kl_divergence(binary_log_masses(teacher_logits, target, temperature),
                       binary_log_masses(student_logits, target, temperature)).mean()
    return kl * temperature**2


def nckd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor,
         temperature: float) -> Tensor:
    """Non-target-class KD: T^2 KL between the distributions over the non-target classes."""
    kl = kl_divergence(non_target_log_probs(teacher_logits, target, temperature),
                       non_target_log_probs(student_logits, target, temperature)).mean()
    return kl * temperature**2


class DKD(Method):
    name = "dkd"
    description = "Decoupled KD: CE + warm-up * (alpha * target-class + beta * non-target KD)"

    @classmethod
    def describe(cls, config) -> str:
        if cls.setting(config, "logit_standardization"):
            return ("Decoupled KD with logit standardization (Sun et al. CVPR 2024): DKD's "
                    "target-class and non-target KD on z-scored logits")
        return cls.description

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
                 warmup_epochs: int = 20, ce_weight: float = 1.0,
                 logit_standardization: bool = False):
        super().__init__()
        # The training epoch, counted from 1; module state so a resumed run warms up alike.
        self.register_buffer("epoch", torch.tensor(1, dtype=torch.long))

    def on_train_epoch_start(self, ctx) -> None:
        self.epoch.fill_(int(ctx.current_epoch) + 1)

    def warmup_factor(self) -> Tensor:
        return linear_warmup(self.epoch, self.warmup_epochs)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        y = batch["target"]
        prepare = standardize_logits if self.logit_standardization else (lambda z: z)
        s = prepare(student.logits)
        warm = self.warmup_factor()
        target_kd = sum(tckd(s, prepare(t.logits), y, self.temperature) for t in teachers)
        other_kd = sum(nckd(s, prepare(t.logits), y, self.temperature) for t in teachers)
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, y),
            "tckd": warm * self.alpha * target_kd / len(teachers),
            "nckd": warm * self.beta * other_kd / len(teachers),
        }
