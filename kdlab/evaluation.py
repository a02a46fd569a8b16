"""Evaluating a student: what a run's test pass measures, shared with ``kdlab eval``.

:class:`StudentMetrics` is what a test pass collects of a model (accuracy, top-5, ECE, NLL,
Brier, and the reliability bins); the run's test step updates it batch by batch.
:func:`evaluate_student` runs a whole split through a student with it, outside a training
run, as Lightning's test loop does (the precision's module and input conversion and its
autocast, the datamodule's evaluation preprocessing, eval mode, inference mode), so that a
run's own test split gives its results.json numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .metrics import RESULT_METRICS, ReliabilityBins, classification_metrics
from .teachers import channels_last


class StudentMetrics(nn.Module):
    """The metrics of one model over a test pass, and its reliability bins."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.metrics = classification_metrics(num_classes)
        self.reliability = ReliabilityBins()

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.metrics.update(logits, target)
        self.reliability.update(logits, target)

    def compute(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """({metric: value}, reliability bins on the CPU), synced over DDP ranks."""
        bins = {k: v.cpu() for k, v in self.reliability.compute().items()}
        return self.metrics.compute(), bins

    def reset(self) -> None:
        self.metrics.reset()
        self.reliability.reset()


def precision_plugin(precision: str, accelerator: str = "auto"):
    """(Lightning's precision plugin, device) for one process, as a Trainer would use them."""
    trainer = pl.Trainer(accelerator=accelerator, devices=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    return trainer.precision_plugin, trainer.strategy.root_device


def evaluate_student(student: nn.Module, dm, split: str, precision: str = "32-true",
                     accelerator: str = "auto",
                     predict: Callable[[Tensor], Tensor] = lambda logits: logits
                     ) -> tuple[dict[str, float], dict[str, list[float]]]:
    """``student`` on every example of ``dm``'s ``split``, in ``precision`` (a Lightning
    precision name): ({metric: value}, reliability bins). ``predict``: the method's
    prediction from the student's outputs (``Method.predict``)."""
    plugin, device = precision_plugin(precision, accelerator)
    # the order of a run: channels_last in the module's setup, then the precision, the device
    student.to(memory_format=torch.channels_last)
    model = plugin.convert_module(student).to(device).eval()
    measured = StudentMetrics(dm.num_classes).to(device)
    with torch.inference_mode():
        for raw in dm.eval_dataloader(split):
            batch = dm.model_batch(plugin.convert_input(raw), device, train=False)
            with plugin.test_step_context():
                logits = predict(model(channels_last(batch["input"]))).float()
            measured.update(logits, batch["target"])
    values, bins = measured.compute()
    return ({k: float(values[k]) for k in RESULT_METRICS if k in values},
            {k: [float(x) for x in v] for k, v in bins.items()})
