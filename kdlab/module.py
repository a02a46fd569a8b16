"""``DistillModule``: the generic LightningModule, only the Lightning hooks.

It trains a student with whatever method it is given, through the method contract in
``kdlab/methods/base.py``; it never asks which method that is. Every method hook gets
``self.context`` (:class:`kdlab.context.RunContext`); teacher outputs come from
:class:`kdlab.teachers.Teachers`, which decides its own caches; a test pass measures the
student with :class:`kdlab.evaluation.StudentMetrics`, as ``kdlab eval`` does.

Student and method are built from their configs, and ``save_hyperparameters`` records
them: ``DistillModule.load_from_checkpoint(path)`` rebuilds the trained student (teachers
are not part of a checkpoint). Randomness is re-seeded at every epoch start from (seed,
epoch, rank), so a run resumed from an epoch-end checkpoint continues exactly as the
uninterrupted run would.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import Tensor, nn

from .context import RunContext
from .errors import NonFiniteLossError
from .evaluation import StudentMetrics
from .methods import instantiate_method
from .methods.base import Batch, derived_seed
from .metrics import Agreement, classification_metrics
from .models import build_model
from .teachers import Teachers, channels_last, forward_with_features


class DistillModule(pl.LightningModule):
    def __init__(self, student: dict[str, Any], method: dict[str, Any], num_classes: int,
                 input_shape: tuple[int, ...], optimizer: dict[str, Any],
                 scheduler: dict[str, Any] | None = None, seed: int = 0,
                 teachers: Teachers | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["teachers"])
        self.student = build_model(student, num_classes, input_shape, where="student")
        self.method = instantiate_method(method)
        self.teachers = teachers if teachers is not None else Teachers([])  # not submodules
        self.num_classes = int(num_classes)
        self.input_shape = tuple(input_shape)
        self.seed = int(seed)
        self.context = RunContext(self)
        self.val_metrics = classification_metrics(num_classes).clone(prefix="val/")
        self.test_metrics = StudentMetrics(num_classes)
        self.teacher_test_metrics = nn.ModuleList(
            classification_metrics(num_classes).clone(prefix=f"teacher{i}/test/")
            for i in range(len(self.teachers)))
        self.test_agreement = nn.ModuleList(Agreement() for _ in range(len(self.teachers)))
        self.reliability_bins: dict[str, Tensor] = {}
        #: Where a test pass logs (kdlab.train sets it): "test" (the selected epoch: student,
        #: teachers and online peers) or "test_last" (the last epoch's student only).
        self.test_key = "test"
        # The epoch counted from 1, logged as `epoch` with every training and validation
        # value (Lightning would log its own counter, from 0); on the device, so that logging
        # it costs no host sync.
        self.register_buffer("_epoch_number", torch.zeros(()), persistent=False)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Outside a training run (``load_from_checkpoint``) the student is rebuilt complete;
        method parts built lazily in ``setup`` are not there yet. The method first loads its
        own state, so that a method that sizes such parts from the saved shapes
        (``_load_from_state_dict``: CRD's embeddings, TGeo-KD's controller, ...) builds them;
        the saved state of parts still missing after that (peers, regressors) is left out
        (call ``method.setup(ctx)`` and ``load_state_dict`` to restore them). In a run,
        setup has built them: all is loaded."""
        if self._trainer is not None:
            return
        prefix = "method."
        self.method.load_state_dict({k[len(prefix):]: v for k, v in
                                     checkpoint["state_dict"].items() if k.startswith(prefix)},
                                    strict=False)
        own = self.state_dict()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if not k.startswith("method.") or k in own}

    def forward(self, x: Tensor) -> Tensor:
        """The student's prediction (logits, as the method defines it: ``Method.predict``)."""
        return self.method.predict(self.student(channels_last(x)))

    # -- training --------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # The student's conv weights in channels_last too (measured 1.15x faster training
        # steps of resnet8x4 in bf16 on CPU); a no-op for models without 4-d weights.
        self.student.to(memory_format=torch.channels_last)
        self.teachers.to(self.device)
        self.method.setup(self.context)

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        dm.train_views = tuple(self.method.input_views)
        self.teachers.prepare(dm, self.method, self.trainer.max_epochs,
                              self.context.teacher_placement())
        self.method.on_fit_start(self.context)

    def on_train_epoch_start(self) -> None:
        # Each epoch's randomness depends only on (seed, epoch, rank): exact resume.
        torch.manual_seed(derived_seed(self.seed, self.current_epoch, self.global_rank))
        self._epoch_number.fill_(self.current_epoch + 1)
        self.method.on_train_epoch_start(self.context)

    def on_train_epoch_end(self) -> None:
        self.log("epoch", self._epoch_number, on_step=False, on_epoch=True)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.method.transforms_batch:  # no longer an enumerated view of stored examples
            batch = {k: v for k, v in self.method.transform_batch(batch, self.context).items()
                     if k != "view"}
        x = channels_last(batch["input"])  # once, for student and teachers
        batch = {**batch, "input": x}
        teachers = (self.teachers.for_training_batch(batch, self.method.teacher_features)
                    if self.method.needs_teacher else [])
        student = forward_with_features(self.student, x, self.method.student_features)
        terms = self.method(student, teachers, batch)
        loss = torch.stack([v.float() for v in terms.values()])
        self._check_finite(loss, list(terms))
        n = x.shape[0]
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, on_step=False, on_epoch=True, batch_size=n)
        loss = loss.sum()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("epoch", self._epoch_number, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.method.on_train_batch_end(self.context, batch)

    def _check_finite(self, values: Tensor, names: list[str]) -> None:
        """One host sync per step; only a non-finite loss looks at the terms one by one."""
        if bool(torch.isfinite(values).all()):
            return
        bad = int((~torch.isfinite(values)).nonzero()[0])
        value = float(values[bad].detach())
        raise NonFiniteLossError(
            f"loss term {names[bad]!r} became {value} at step {self.global_step} "
            f"(epoch {self.current_epoch + 1}); training stopped, the last good checkpoint is "
            "kept (lower the learning rate or check the data)")

    # -- evaluation ------------------------------------------------------------------------
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        logits = self(batch["input"]).float()
        self.val_metrics.update(logits, batch["target"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()  # torchmetrics has already synced the ranks
        self.log("val/acc", values.pop("val/acc"), prog_bar=True)
        self.log_dict(values)
        if self.trainer.state.fn == "fit":  # the epoch it belongs to
            self.log("epoch", self._epoch_number)
        self.val_metrics.reset()

    def on_test_start(self) -> None:
        self.teachers.to(self.device)
        # networks the method trains besides the student (online peers): tested alike
        peers = self.method.evaluated_models() if self.test_key == "test" else {}
        self.peer_test_metrics = nn.ModuleDict({
            name: classification_metrics(self.num_classes).clone(prefix=f"peer/{name}/test/")
            for name in peers}).to(self.device)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = channels_last(batch["input"]), batch["target"]
        logits = self(x).float()
        self.test_metrics.update(logits, y)
        if self.test_key != "test":  # the last epoch: the student only
            return
        for i, t in enumerate(self.teachers.forward(x)):
            self.teacher_test_metrics[i].update(t.logits, y)
            self.test_agreement[i].update(logits, t.logits)
        for name, model in self.method.evaluated_models().items():
            self.peer_test_metrics[name].update(model(x).float(), y)

    def on_test_epoch_end(self) -> None:
        values, self.reliability_bins = self.test_metrics.compute()
        self.log_dict({f"{self.test_key}/{k}": v for k, v in values.items()})
        tested = [self.test_metrics]
        if self.test_key == "test":
            for i, metrics in enumerate(self.teacher_test_metrics):
                self.log_dict(metrics.compute())
                self.log(f"teacher{i}/test/agreement", self.test_agreement[i].compute())
            for metrics in self.peer_test_metrics.values():
                self.log_dict(metrics.compute())
            tested += [*self.teacher_test_metrics, *self.test_agreement,
                       *self.peer_test_metrics.values()]
        for m in tested:
            m.reset()

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        params = list(self.student.parameters()) + self.method.extra_parameters()
        optimizer = instantiate(self.hparams.optimizer)(params)
        if not self.hparams.scheduler:
            return optimizer
        scheduler = instantiate(self.hparams.scheduler)(optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
