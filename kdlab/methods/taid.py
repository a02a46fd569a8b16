"""Temporally adaptive interpolated distillation, TAID (Shing, Misaki, Bao, Yokoi, Akiba,
"TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in
Language Models", ICLR 2025, arXiv 2501.16937).

The student is trained towards an intermediate teacher that moves from the student's own
distribution to the teacher's as the interpolation coefficient t grows:

    p_t = softmax( (1 - t) * stopgrad(s) + t * teacher_logits )
    L   = mean_i  - sum_c p_t,ic * log softmax(s_i)_c           (CE of the student to p_t)

t is driven by the relative decrease of an objective J. After optimiser step n = 1 .. N
(N = total training steps), whose loss used t_{n-1} and whose objective is J_n:

    n = 1:     J_prev = J_1                              (nothing to compare with yet)
    n > 1:     delta_n = (J_prev - J_n) / J_prev         relative decrease of the objective
               m_n     = beta * m_{n-1} + (1 - beta) * delta_n          (momentum, m_0 = 0)
               floor_n = t_start + (t_end - t_start) * (n - 1) / N      (linear floor)
               t_n     = min(t_end, max(floor_n, t_{n-1} + alpha * sigmoid(m_n) * (1 - t_{n-1})))
               J_prev  = J_n

The loss of step n uses t_{n-1} (t_0 = t_1 = t_start). So t never decreases, never falls
behind the linear schedule, and moves ahead of it faster while the objective is falling
quickly. Defaults t_start = 0.4, t_end = 1.0, alpha = 5e-4, beta = 0.99.

This is the authors' released schedule step by step (SakanaAI/TAID,
``src/distil_losses/taid.py``: ``TAID.forward`` computes the loss with the current t, then
calls ``update_t`` with the loss value and ``trainer.global_step``, which inside
``training_step`` is the number of optimiser steps already taken, n - 1). Two options keep
the other readings:

- ``floor_progress: ahead``: floor_n = t_start + (t_end - t_start) * n / N (the steps taken
  after step n; kdlab's schedule before it followed the release, one step ahead of it).
- ``objective: kl``: J = KL(p_t || softmax(s)) = CE - H(p_t) (the divergence the paper's
  objective is named after; kdlab's earlier choice) instead of the release's J = the loss
  value itself, CE(s, p_t) (its ``forward_kl`` with ``teacher_probs=p_t`` returns the
  cross-entropy). Both give the student the same gradient; their relative decreases differ
  (H(p_t) moves with t and the student), so t moves differently.

Not reproduced: the release's loss is also called in ``validation_step``, so its t, m and
J_prev move on every validation batch too (``limit_val_batches=5`` per validation run in
its ``train.py``); kdlab's move on training steps only. t, m and J_prev are buffers (saved
in checkpoints, restored on resume); under DDP J is averaged over the ranks so every rank
keeps the same t (the release keeps one t per rank). One teacher.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Method, Outputs, require_teachers, soft_cross_entropy


def interpolated_target(student_logits: Tensor, teacher_logits: Tensor, t: Tensor | float
                        ) -> Tensor:
    """p_t = softmax((1 - t) * stopgrad(s) + t * teacher_logits)."""
    mixed = (1 - t) * student_logits.detach().float() + t * teacher_logits.float()
    return F.softmax(mixed, dim=-1)


FloorProgress = Literal["released", "ahead"]
Objective = Literal["ce", "kl"]


class TAID(Method):
    name = "taid"
    description = "TAID: CE to an adaptive interpolation from the student to the teacher"

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, total_steps: int | None = None,
                 floor_progress: FloorProgress = "released", objective: Objective = "ce"):
        super().__init__()
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ConfigError(f"taid needs 0 <= t_start <= t_end <= 1, got {t_start}, {t_end}")
        self.register_buffer("t", torch.tensor(t_start))
        self.register_buffer("momentum", torch.tensor(0.0))
        self.register_buffer("prev_objective", torch.tensor(float("nan")))  # nan: none yet
        self._objective: Tensor | None = None
        self._steps = total_steps or math.inf  # the floor's N (the trainer's, from setup)

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)

    def on_fit_start(self, ctx) -> None:
        self._steps = float(self.total_steps or ctx.total_steps)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        p_t = interpolated_target(student.logits, teachers[0].logits, self.t)
        ce = soft_cross_entropy(student.logits, p_t)
        objective = ce
        if self.objective == "kl":  # J = KL(p_t || softmax(s)) = CE - H(p_t)
            entropy = -torch.special.xlogy(p_t, p_t).sum(-1).mean()
            objective = ce - entropy
        self._objective = objective.detach()
        return {"taid": ce}

    def floor(self, step: int) -> float:
        """The linear schedule t_start -> t_end for the update after optimiser step ``step``
        (1-based): at (step - 1) / N (``released``) or step / N (``ahead``)."""
        if not math.isfinite(self._steps) or self._steps <= 0:
            return self.t_start
        done = step - 1 if self.floor_progress == "released" else step
        return self.t_start + (self.t_end - self.t_start) * min(done / self._steps, 1.0)

    def update(self, objective: Tensor, step: int) -> None:
        """One step of the schedule in the docstring, given J_n and n (the optimiser steps
        taken, this one included)."""
        objective = objective.to(self.t.dtype)
        # The first step only records J; branch-free, so no host sync on a GPU.
        first = torch.isnan(self.prev_objective)
        prev = torch.where(first, objective, self.prev_objective)
        delta = (prev - objective) / prev.clamp_min(1e-12)
        momentum = self.beta * self.momentum + (1 - self.beta) * delta
        ahead = self.t + self.alpha * torch.sigmoid(momentum) * (1 - self.t)
        t = ahead.clamp_min(self.floor(step)).clamp_max(self.t_end)
        self.momentum.copy_(torch.where(first, self.momentum, momentum))
        self.t.copy_(torch.where(first, self.t, t))
        self.prev_objective.copy_(objective)

    def on_train_batch_end(self, ctx, batch) -> None:
        """After optimiser step n (``ctx.global_step`` counts it already)."""
        if self._objective is None:
            return
        objective, self._objective = self._objective, None
        if ctx.world_size > 1:
            objective = ctx.all_gather(objective).mean()
        self.update(objective, int(ctx.global_step))

    def results(self):
        return {"taid": {"t_final": float(self.t), "momentum_final": float(self.momentum)}}
