"""Progressive self-knowledge distillation, PS-KD (Kim, Ji, Yoon, Hwang, "Self-Knowledge
Distillation with Progressive Refinement of Targets", ICCV 2021, arXiv 2006.12000).

The student is its own teacher. For example i in epoch e (counted from 0) of E epochs:

    a_e = a_T * (e + 1) / E                                  (a_T = 0.8)
    q_i = (1 - a_e) * onehot(y_i) + a_e * p_prev(x_i)
    L   = mean_i  - sum_c q_ic * log softmax(s_i)_c          (soft-target cross-entropy)

p_prev(x_i) is the student's own softmax for x_i from the previous epoch. No teacher.

Memory (module state, saved in checkpoints): ``memory`` (N_train, C) holds for every
training example the softmax of the logits the student produced the last time it saw it,
and ``has_memory`` (N_train,) marks the rows that hold one. Rows are addressed by
``batch["index"]``. One buffer, read before write: a step first builds its targets from
the memory, and only after the optimiser step (``on_train_batch_end``) are the memory rows
of that batch overwritten with the step's detached predictions. Every example is seen once
per epoch, so its target uses the prediction made in the previous epoch (the most recent
one, should ``drop_last`` have left it out of an epoch) -- the same targets as two buffers
swapped per epoch, at half the memory. Examples with no stored prediction (all of the first
epoch) get the one-hot label. Under DDP the predictions are gathered from all ranks before
they are written, so every rank holds the whole memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Method, Outputs, gather_from_ranks, soft_cross_entropy


class PSKD(Method):
    name = "pskd"
    description = "PS-KD self-distillation: label mixed with the student's last-epoch prediction"
    needs_teacher = False

    def __init__(self, alpha_T: float = 0.8, max_epochs: int | None = None):
        super().__init__()
        # Sized in setup() once the training-set size is known.
        self.register_buffer("memory", torch.zeros(0, 0))
        self.register_buffer("has_memory", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("alpha", torch.tensor(0.0))  # a_e of the current epoch
        self._pending: tuple[Tensor, Tensor] | None = None

    # -- state -----------------------------------------------------------------------------
    def setup(self, ctx) -> None:
        n, c = int(ctx.train_size), int(ctx.num_classes)
        if tuple(self.memory.shape) != (n, c):  # idempotent: setup runs for every stage
            self.memory = torch.zeros(n, c, device=ctx.device)
            self.has_memory = torch.zeros(n, dtype=torch.bool, device=ctx.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A module that has not run setup() yet can still load a checkpoint's memory.
        for name in ("memory", "has_memory"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype,
                                                device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_epoch_start(self, ctx) -> None:
        epochs = self.max_epochs if self.max_epochs is not None else ctx.max_epochs
        if epochs is None or epochs <= 0:
            raise ConfigError("pskd needs the number of epochs E: set trainer.max_epochs "
                              "or method.max_epochs")
        self.alpha.fill_(self.alpha_T * (int(ctx.current_epoch) + 1) / epochs)

    # -- loss ------------------------------------------------------------------------------
    def targets(self, target: Tensor, index: Tensor) -> Tensor:
        """(1 - a_e) onehot(y) + a_e p_prev for rows with a stored prediction, else onehot(y)."""
        if self.memory.numel() == 0:
            raise RuntimeError("pskd memory is not set up: setup(ctx) must run first")
        onehot = F.one_hot(target, self.memory.shape[1]).float()
        soft = (1.0 - self.alpha) * onehot + self.alpha * self.memory[index]
        return torch.where(self.has_memory[index][:, None], soft, onehot)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        index = batch["index"]
        q = self.targets(batch["target"], index)
        logits = student.logits.float()
        self._pending = (index, F.softmax(logits.detach(), dim=-1))
        return {"soft_ce": soft_cross_entropy(logits, q)}

    def on_train_batch_end(self, ctx, batch) -> None:
        """Store this step's predictions: the targets of these examples next epoch."""
        if self._pending is None:
            return
        index, probs = self._pending
        self._pending = None
        index, probs = gather_from_ranks(ctx, index), gather_from_ranks(ctx, probs)
        self.memory[index] = probs.to(self.memory.dtype)
        self.has_memory[index] = True
