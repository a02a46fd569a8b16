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

How the past predictions are stored (``store``, ``precision``; the memory table in
docs/methods.md gives the bytes at ImageNet scale):

* ``store=full`` (default): the whole softmax, ``memory`` (N_train, C) -- the paper.
* ``store=topk``: only the ``top_k`` largest probabilities of each row (``memory``
  (N_train, k)) and their classes (``memory_classes`` (N_train, k), int16 up to 32768
  classes, else int32). The stored prediction is those k probabilities, with the rest of
  the mass, 1 - their sum, spread evenly over the other C - k classes. A deviation from the
  paper, which keeps the full distribution: the tail's ranking is lost. For large N x C
  (ImageNet: 5.1 GB per rank in float32, 2.6 GB in float16; top-10 in float16: 53 MB).
* ``precision=float16`` stores the probabilities (full or top-k) in float16: 11
  significant bits (relative error <= 2^-11) down to 6.1e-5, smaller ones to within
  3e-8 (subnormals). Not bfloat16, whose 8 bits would round a probability by up to 0.4 %.

The targets are built from the stored (rounded, truncated) predictions, and the memory is
module state in every form, so a resumed run reads what the uninterrupted one read.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .base import Method, Outputs, StateBuffer, StateSizes, gather_from_ranks, soft_cross_entropy

Store = Literal["full", "topk"]
Precision = Literal["float32", "float16"]
PRECISIONS = {"float32": torch.float32, "float16": torch.float16}


def class_index_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds every class id."""
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max + 1 else torch.int32


def spread_rest(values: Tensor, classes: Tensor, num_classes: int) -> Tensor:
    """(n, C) distributions from the top-k probabilities ``values`` (n, k) of the classes
    ``classes`` (n, k): those k entries, and 1 - their sum spread evenly over the others."""
    k = values.shape[1]
    rest = (1.0 - values.sum(1, keepdim=True)).clamp_min(0.0) / max(num_classes - k, 1)
    probs = rest.expand(-1, num_classes).clone()
    return probs.scatter_(1, classes.long(), values)


class PSKD(Method):
    name = "pskd"
    description = "PS-KD self-distillation: label mixed with the student's last-epoch prediction"
    needs_teacher = False

    def __init__(self, alpha_T: float = 0.8, max_epochs: int | None = None,
                 store: Store = "full", precision: Precision = "float32", top_k: int = 10):
        super().__init__()
        if top_k < 1:
            raise ConfigError(f"method.top_k must be an integer >= 1, got {top_k}")
        self.num_classes = 0  # C, known in setup()
        # Sized in setup() once the training-set size is known.
        self.register_buffer("memory", torch.zeros(0, 0, dtype=PRECISIONS[precision]))
        if store == "topk":
            self.register_buffer("memory_classes", torch.zeros(0, 0, dtype=torch.int16))
        self.register_buffer("has_memory", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("alpha", torch.tensor(0.0))  # a_e of the current epoch
        self._pending: tuple[Tensor, ...] | None = None

    # -- state -----------------------------------------------------------------------------
    @property
    def memory_names(self) -> tuple[str, ...]:
        """The buffers a stored prediction is written into, in the order of ``compress``."""
        return ("memory", "memory_classes") if self.store == "topk" else ("memory",)

    def state_buffers(self, sizes: StateSizes) -> dict[str, StateBuffer]:
        n, c = sizes.num_examples, sizes.num_classes
        width = min(self.top_k, c) if self.store == "topk" else c
        state = {"memory": StateBuffer((n, width), PRECISIONS[self.precision])}
        if self.store == "topk":
            state["memory_classes"] = StateBuffer((n, width), class_index_dtype(c))
        return {**state, "has_memory": StateBuffer((n,), torch.bool)}

    def setup(self, ctx) -> None:
        self.num_classes = int(ctx.num_classes)
        sizes = StateSizes(int(ctx.train_size), self.num_classes)
        for name, buffer in self.state_buffers(sizes).items():
            current = getattr(self, name)
            if tuple(current.shape) != buffer.shape:  # idempotent: setup runs for every stage
                setattr(self, name, torch.zeros(buffer.shape, dtype=buffer.dtype,
                                                device=ctx.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A module that has not run setup() yet can still load a checkpoint's memory.
        memory = state_dict.get(prefix + "memory")
        topk = prefix + "memory_classes" in state_dict
        if memory is not None and (memory.dtype != self.memory.dtype
                                   or topk != (self.store == "topk")):
            raise ConfigError("the checkpoint's pskd memory was stored with other settings "
                              f"than this run's (method.store={self.store}, method.precision="
                              f"{self.precision}): resume with the settings it was written with")
        for name in (*self.memory_names, "has_memory"):
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=saved.dtype,
                                                device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_epoch_start(self, ctx) -> None:
        epochs = self.max_epochs if self.max_epochs is not None else ctx.max_epochs
        if epochs is None or epochs <= 0:
            raise ConfigError("pskd needs the number of epochs E: set trainer.max_epochs "
                              "or method.max_epochs")
        self.alpha.fill_(self.alpha_T * (int(ctx.current_epoch) + 1) / epochs)

    # -- loss ------------------------------------------------------------------------------
    def stored_predictions(self, index: Tensor) -> Tensor:
        """(n, C) p_prev of these examples as stored (rounded to ``precision``; top-k: the
        rest of the mass spread evenly), in float32."""
        if self.store == "full":
            return self.memory[index].float()
        return spread_rest(self.memory[index].float(), self.memory_classes[index],
                           self.num_classes)

    def compress(self, probs: Tensor) -> tuple[Tensor, ...]:
        """What is stored of predictions (n, C), one tensor per ``memory_names`` entry (class
        ids as int32, which every DDP backend gathers; narrowed when written)."""
        if self.store == "full":
            return (probs.to(self.memory.dtype),)
        values, classes = probs.topk(self.memory.shape[1], dim=1)
        return values.to(self.memory.dtype), classes.to(torch.int32)

    def targets(self, target: Tensor, index: Tensor) -> Tensor:
        """(1 - a_e) onehot(y) + a_e p_prev for rows with a stored prediction, else onehot(y)."""
        if self.memory.numel() == 0 or not self.num_classes:
            raise RuntimeError("pskd memory is not set up: setup(ctx) must run first")
        onehot = F.one_hot(target, self.num_classes).float()
        soft = (1.0 - self.alpha) * onehot + self.alpha * self.stored_predictions(index)
        return torch.where(self.has_memory[index][:, None], soft, onehot)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        index = batch["index"]
        q = self.targets(batch["target"], index)
        logits = student.logits.float()
        self._pending = (index, *self.compress(F.softmax(logits.detach(), dim=-1)))
        return {"soft_ce": soft_cross_entropy(logits, q)}

    def on_train_batch_end(self, ctx, batch) -> None:
        """Store this step's predictions: the targets of these examples next epoch."""
        if self._pending is None:
            return
        index, *stored = (gather_from_ranks(ctx, part) for part in self._pending)
        self._pending = None
        for name, value in zip(self.memory_names, stored, strict=True):
            getattr(self, name)[index] = value.to(getattr(self, name).dtype)
        self.has_memory[index] = True
