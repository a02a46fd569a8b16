"""Partial mixup with logit-standardised KD (Choi, Park, Lee, "Understanding the Role of Mixup
in Knowledge Distillation: An Empirical Study", WACV 2023, arXiv 2211.03946).

Batch transform (student and teacher both see the transformed batch; no logit cache):

    x1, y1 = x[perm1], y[perm1]         x2, y2 = x[perm2], y[perm2]     (two permutations)
    l_i ~ Beta(a, a) for the mixed rows, l_i = 1 for the others            (a = 1)
    x~_i = l_i x1_i + (1 - l_i) x2_i        y~_i = l_i onehot(y1_i) + (1 - l_i) onehot(y2_i)

Loss, with sigma(z) the per-example standard deviation of a logit vector over the classes
(sample std, n - 1, as ``torch.std``; no fixed temperature and no T^2):

    L = w_ce * mean_i [ -sum_c y~_ic log softmax(s_i / sigma(s_i))_c ]
      + w_kd * mean_i KL( softmax(t_i / sigma(t_i)) || softmax(s_i / sigma(s_i)) )

Defaults w_ce = 0.1, w_kd = 0.9, a = 1. The gradient flows through sigma(s) as well.

**Which rows are mixed.** ``mixed_fraction`` is the share of each batch that is mixed; the
released code's help text describes its default as "10 %" mixed (``--partmixup 0.9``,
"0.9=10%"). The released code (hchoi71/MIX-KD, ``PMU``) draws the
int(0.9 B) "kept" rows *with replacement*, so only 1 - (1 - 1/B)^int(0.9 B) of the rows are
kept: about 41 % of a 64-batch is mixed. ``partial="stated"`` (default) mixes exactly
round(mixed_fraction * B) rows chosen without replacement -- the stated 10 %;
``partial="released"`` reproduces the released draw (int((1 - mixed_fraction) * B) kept
indices with replacement). A kept row is still an example of the first permutation. The
draws of a training step come from a seed of (run seed, optimiser step, rank), so a resumed
run mixes the same batches.

**Evaluation.** The loss only sees s / sigma(s), which is invariant to any positive
rescaling of s: the raw logit scale is left to weight decay and chance, and the model's
prediction is softmax(s / sigma(s)) (the released ``validate`` standardises the logits the
same way). With ``standardize_eval_logits=true`` (default) ``predict`` returns s / sigma(s):
validation, test, ECE, NLL and ``kdlab eval`` measure that prediction (accuracy is
unchanged).

**A ceiling on confidence.** A standardised logit vector has at most a gap of sqrt(C) between
its largest entry and the rest, so softmax(z / sigma(z)) never exceeds
e^sqrt(C) / (e^sqrt(C) + C - 1): 0.995 for CIFAR-100's 100 classes, but 0.82 for 20 classes
and 0.72 for 10. On few-class data the standardised predictions (and the standardised
teacher targets) are bound to be under-confident.

One teacher (several: the KD term is averaged over them).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Method, Outputs, derived_seed, kl_divergence, require_teachers

Partial = Literal["stated", "released"]
STD_FLOOR = 1e-6  # a constant logit vector has sigma = 0: keep the division finite


def logit_std(logits: Tensor) -> Tensor:
    """sigma(z): the sample standard deviation of each row over the classes, shape (B, 1)."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return z.std(dim=-1, keepdim=True).clamp_min(STD_FLOOR)


def standardized_log_probs(logits: Tensor) -> Tensor:
    """log softmax(z / sigma(z))."""
    z = logits if logits.dtype == torch.float64 else logits.float()
    return F.log_softmax(z / logit_std(z), dim=-1)


def mixed_rows(batch_size: int, mixed_fraction: float, partial: str,
               device: torch.device) -> Tensor:
    """Boolean mask of the rows that get mixed (see the module docstring for the two modes)."""
    if partial == "stated":
        count = int(round(mixed_fraction * batch_size))
        mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
        mask[torch.randperm(batch_size, device=device)[:count]] = True
        return mask
    kept = torch.randint(0, batch_size, (int(batch_size * (1.0 - mixed_fraction)),),
                         device=device)
    mask = torch.ones(batch_size, dtype=torch.bool, device=device)
    mask[kept] = False
    return mask


def partial_mixup(inputs: Tensor, targets: Tensor, num_classes: int, mixed_fraction: float,
                  beta_alpha: float, partial: Partial = "stated"
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(mixed inputs, soft targets, mixing weights l (B,), first permutation)."""
    b = inputs.shape[0]
    perm1 = torch.randperm(b, device=inputs.device)
    perm2 = torch.randperm(b, device=inputs.device)
    beta = torch.distributions.Beta(torch.tensor(float(beta_alpha), device=inputs.device),
                                    torch.tensor(float(beta_alpha), device=inputs.device))
    lam = beta.sample((b,))
    lam = torch.where(mixed_rows(b, mixed_fraction, partial, inputs.device), lam,
                      torch.ones_like(lam))
    shape = (b,) + (1,) * (inputs.dim() - 1)
    w = lam.to(inputs.dtype).view(shape)
    x = w * inputs[perm1] + (1 - w) * inputs[perm2]
    onehot = F.one_hot(targets, num_classes).float()
    y = lam[:, None] * onehot[perm1] + (1 - lam[:, None]) * onehot[perm2]
    return x, y, lam, perm1


def mixing_seed(seed: int, step: int, rank: int) -> int:
    """The seed of one training step's mixup draws."""
    return derived_seed(seed, step, rank) % (2 ** 63 - 1)


def soft_label_loss(student_logits: Tensor, soft_target: Tensor) -> Tensor:
    """mean_i -sum_c y~_ic log softmax(s_i / sigma(s_i))_c."""
    log_p = standardized_log_probs(student_logits)
    return -(soft_target.to(log_p.dtype) * log_p).sum(-1).mean()


def standardized_kd(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """mean_i KL(softmax(t_i / sigma(t_i)) || softmax(s_i / sigma(s_i)))."""
    log_p_s = standardized_log_probs(student_logits)
    log_p_t = standardized_log_probs(teacher_logits.detach().to(log_p_s.dtype))
    return kl_divergence(log_p_t, log_p_s).mean()


class MixupKD(Method):
    name = "mixup_kd"
    description = "Mixup KD: partial mixup batches, CE + KL on logits divided by their std"

    def __init__(self, mixed_fraction: float = 0.1, partial: Partial = "stated",
                 beta_alpha: float = 1.0, ce_weight: float = 0.1, kd_weight: float = 0.9,
                 standardize_eval_logits: bool = True):
        super().__init__()
        if not 0.0 <= mixed_fraction <= 1.0:
            raise ConfigError(f"method.mixed_fraction must be in [0, 1], got {mixed_fraction}")
        if beta_alpha <= 0:
            raise ConfigError(f"method.beta_alpha must be > 0, got {beta_alpha}")

    def predict(self, logits: Tensor) -> Tensor:
        """The prediction is softmax(s / sigma(s)) (the loss never sees s's own scale)."""
        if not self.standardize_eval_logits:
            return logits
        z = logits.float()
        return z / logit_std(z)

    def transform_batch(self, batch, ctx):
        # Draws from a generator seeded by (seed, step, rank) and restored afterwards: the
        # same batches after a resume whatever else used the global RNG before this step.
        x = batch["input"]
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(mixing_seed(ctx.seed, ctx.global_step, ctx.global_rank))
            x, y, lam, perm1 = partial_mixup(x, batch["target"], ctx.num_classes,
                                             self.mixed_fraction, self.beta_alpha,
                                             self.partial)
        # "target": each mixed example's dominant label (for anything that reads hard labels)
        return {**batch, "input": x, "soft_target": y, "mix_weight": lam,
                "target": y.argmax(-1), "index": batch["index"][perm1]}

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers))
        s = student.logits
        soft = batch.get("soft_target")
        if soft is None:  # called without the transform: the plain labels
            soft = F.one_hot(batch["target"], s.shape[-1]).float()
        kd = sum(standardized_kd(s, t.logits) for t in teachers) / len(teachers)
        return {"ce": self.ce_weight * soft_label_loss(s, soft), "kd": self.kd_weight * kd}
