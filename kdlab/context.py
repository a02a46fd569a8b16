"""``RunContext``: the running training as the methods see it (``MethodContext``).

A plain object, not an ``nn.Module``: a method may keep it as an attribute. It wraps the
LightningModule and reads, when asked, the module (models, sizes, progress), the trainer it
is attached to (epochs, steps, learning rate, ranks, precision, run directory) and that
trainer's datamodule (split sizes, examples, the noise mask). Outside a trainer (a module
built by hand, ``load_from_checkpoint``) it answers for one process in full precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .methods.base import Batch, Outputs
from .teachers import Placement

if TYPE_CHECKING:  # the module that owns this context (kdlab.module imports this file)
    import pytorch_lightning as pl


class RunContext:
    """What a method may use of the running training (see ``MethodContext``)."""

    def __init__(self, module: pl.LightningModule):
        self._module = module

    @property
    def _trainer(self):
        return self._module._trainer  # None until the module is attached to a trainer

    @property
    def _datamodule(self):
        return self._trainer.datamodule

    # -- models, sizes, progress -----------------------------------------------------------
    @property
    def student(self) -> nn.Module:
        return self._module.student

    @property
    def teachers(self) -> Sequence[nn.Module]:
        return self._module.teachers.models

    @property
    def num_classes(self) -> int:
        return self._module.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._module.input_shape

    @property
    def seed(self) -> int:
        return self._module.seed

    @property
    def device(self) -> torch.device:
        return self._module.device

    @property
    def train_size(self) -> int:
        return int(self._datamodule.train_size)

    @property
    def batch_size(self) -> int:
        return int(self._datamodule.batch_size)

    @property
    def noise_mask(self) -> Tensor | None:
        return self._datamodule.noise_mask

    @property
    def current_epoch(self) -> int:
        return self._module.current_epoch

    @property
    def global_step(self) -> int:
        return self._module.global_step

    @property
    def max_epochs(self) -> int:
        return int(self._trainer.max_epochs)

    @property
    def total_steps(self) -> int:
        return int(self._trainer.estimated_stepping_batches)

    @property
    def current_lr(self) -> float:
        return float(self._trainer.optimizers[0].param_groups[0]["lr"])

    @property
    def global_rank(self) -> int:
        return self._module.global_rank

    @property
    def world_size(self) -> int:
        return int(self._trainer.world_size) if self._trainer is not None else 1

    @property
    def is_global_zero(self) -> bool:
        return self._trainer is None or bool(self._trainer.is_global_zero)

    @property
    def run_dir(self) -> Path:
        return Path(self._trainer.default_root_dir)

    # -- data and teacher outputs ----------------------------------------------------------
    def precision_context(self) -> AbstractContextManager:
        """The trainer's precision (e.g. bf16 autocast) for forward passes outside its steps."""
        if self._trainer is None:
            return nullcontext()
        return self._trainer.precision_plugin.forward_context()

    def examples(self, split: str, index: Tensor | None = None) -> Batch:
        return self._datamodule.examples(split, index, self.device)

    def teacher_outputs(self, x: Tensor, paths: tuple[str, ...] = ()) -> list[Outputs]:
        with self.precision_context():
            return self._module.teachers.forward(x, paths)

    def clean_train_teacher_outputs(self, batch: Batch) -> list[Outputs]:
        with self.precision_context():
            return self._module.teachers.for_train_examples(batch)

    def all_gather(self, tensor: Tensor) -> Tensor:
        return self._module.all_gather(tensor)

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self._module.log(name, value, **kwargs)

    # -- for the module: where its teachers run --------------------------------------------
    def teacher_placement(self) -> Placement:
        """The device, precision and rank the teachers run with in this process."""
        trainer = self._trainer
        return Placement(device=self.device, precision=str(trainer.precision),
                         autocast=self.precision_context, writes_files=self.is_global_zero,
                         show_progress=self.is_global_zero
                         and trainer.progress_bar_callback is not None)
