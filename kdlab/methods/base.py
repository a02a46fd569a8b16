"""The method contract.

A distillation method is an ``nn.Module`` (so whatever it learns or remembers across steps
lives in its buffers/parameters and is saved in checkpoints). The LightningModule never asks
which method it runs; it only calls this contract:

* ``needs_teacher`` — whether teacher outputs must be computed for the training batch.
* ``reads_clean_train_teacher`` — the method walks the un-augmented train split itself
  (``ctx.clean_train_teacher_outputs``); the module then keeps every teacher's logits on it
  in memory even when training batches are augmented, so such passes cost no teacher forward.
* ``student_features`` / ``teacher_features`` — module paths (``"layer2"``, ``"block.1.conv"``)
  whose outputs the method needs; they are taken with forward hooks.
* ``loss_terms(student, teachers, batch)`` — returns ``{term name: already-weighted scalar}``;
  the training loss is their sum and each term is logged on its own.
* Optional hooks with the running ``DistillModule`` as ``ctx``: ``setup`` (before
  optimisers are built and before a checkpoint is restored: create state buffers and
  learnable parts whose shapes depend on the data or models here), ``on_fit_start``,
  ``on_train_epoch_start``, ``on_train_batch_end`` (after the optimiser step).
  ``setup`` runs for every stage (fit, validate, test): keep it idempotent.
* ``results()`` — extra entries for the run's ``results.json``. It is called after the
  best-on-val checkpoint has been loaded back for testing, so a method reports state it
  kept itself (e.g. the final weights), not what the buffers hold at that moment.

``ctx`` gives ``ctx.student``, ``ctx.teachers``, ``ctx.teacher_outputs(x)``,
``ctx.teacher_outputs_for(batch)`` (uses the per-example teacher cache when there is one),
``ctx.clean_train_teacher_outputs(batch)`` (for batches of ``train_eval_dataloader``),
``ctx.precision_context()`` (the trainer's autocast, for a method's own forward passes),
``ctx.num_classes``, ``ctx.device``, ``ctx.trainer`` (``ctx.trainer.datamodule`` has
``train_size``, ``noise_mask``, ``meta_dataloader()``, ``train_eval_dataloader()``,
``model_batch(batch, device)``), ``ctx.current_epoch``, ``ctx.global_step``,
``ctx.current_lr``, ``ctx.all_gather`` and ``ctx.log(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Outputs:
    """What a forward pass of a student or teacher hands to a method."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


class Method(nn.Module):
    """Base class: subclasses set ``name``/``description`` and implement ``loss_terms``."""

    name: str = "method"
    description: str = ""
    needs_teacher: bool = True
    reads_clean_train_teacher: bool = False
    student_features: tuple[str, ...] = ()
    teacher_features: tuple[str, ...] = ()

    def loss_terms(
        self, student: Outputs, teachers: list[Outputs], batch: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, student: Outputs, teachers: list[Outputs], batch: dict[str, Tensor]):
        return self.loss_terms(student, teachers, batch)

    # Hooks: the default is to do nothing. ``ctx`` is the running DistillModule.
    def setup(self, ctx: Any) -> None:
        pass

    def on_fit_start(self, ctx: Any) -> None:
        pass

    def on_train_epoch_start(self, ctx: Any) -> None:
        pass

    def on_train_batch_end(self, ctx: Any, batch: dict[str, Tensor]) -> None:
        pass

    def results(self) -> dict[str, Any]:
        return {}

    def extra_parameters(self) -> list[nn.Parameter]:
        """Learnable parts of the method (e.g. a FitNet regressor) that join the optimiser."""
        return [p for p in self.parameters() if p.requires_grad]


# Shared loss terms, written once and reused by the methods.


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy against hard labels, computed in float32."""
    return F.cross_entropy(logits.float(), target)


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """Mean over the batch of -sum_c q_c log softmax(s)_c."""
    return -(target_probs * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def kd_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
          reduction: str = "mean") -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), summed over classes.

    ``reduction="mean"`` averages over the batch, ``"none"`` returns one value per example.
    """
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_example = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t * t
    if reduction == "none":
        return per_example
    return per_example.mean()


def require_teachers(teachers: list[Outputs], method: str) -> None:
    if not teachers:
        raise ValueError(f"method {method!r} needs a teacher but none was given")


def zeros_like_loss(ref: Tensor) -> Tensor:
    return torch.zeros((), device=ref.device, dtype=torch.float32)
