"""Callbacks that kdlab adds to every run."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import convert_inf

from .errors import ConfigError
from .selection import Record, SelectionRule

log = logging.getLogger("kdlab")


class SelectionCheckpoint(Checkpoint):
    """``checkpoints/last.ckpt`` after every epoch, and ``checkpoints/best.ckpt`` after every
    validated epoch that the selection rule (:mod:`kdlab.selection`) puts first so far.

    Every validation's val metrics are recorded (epochs from 1); the records are the
    callback's checkpointed state, so a run resumed from last.ckpt chooses among the same
    history as the uninterrupted run. Both files are written at the end of the training
    epoch (validation has run by then), best before last, through the trainer's checkpoint
    IO (atomic writes).
    """

    def __init__(self, dirpath: str | Path, rule: SelectionRule):
        self.dirpath = Path(dirpath)
        self.rule = rule
        self.records: list[Record] = []
        self._validated_epoch: int | None = None

    @property
    def best_path(self) -> str:
        return str(self.dirpath / "best.ckpt")

    @property
    def last_path(self) -> str:
        return str(self.dirpath / "last.ckpt")

    @property
    def chosen(self) -> Record | None:
        """The selected epoch's record (None before any validation)."""
        return self.rule.select(self.records) if self.records else None

    def reason(self) -> str:
        return self.rule.explain(self.records, self.chosen)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items()
                  if k.startswith("val/")}
        if self.rule.metric not in values:
            raise ConfigError(f"selection.metric {self.rule.metric} was not logged (logged: "
                              f"{', '.join(sorted(values)) or 'no val/ metric'})")
        epoch = trainer.current_epoch + 1
        self.records = [r for r in self.records if r.epoch != epoch] + [Record(epoch, values)]
        self._validated_epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        if self._validated_epoch == epoch and self.chosen.epoch == epoch:
            trainer.save_checkpoint(self.best_path, weights_only=False)
        self._validated_epoch = None
        trainer.save_checkpoint(self.last_path, weights_only=False)

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.as_dict(),
                "records": [{"epoch": r.epoch, "values": dict(r.values)} for r in self.records]}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """A resumed fit continues the history saved in last.ckpt. (Testing best.ckpt loads
        callback states too: this run's full history is kept then.)"""
        if trainer.state.fn != "fit":
            return
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        self.records = [Record(int(r["epoch"]), {k: float(v) for k, v in r["values"].items()})
                        for r in state.get("records", [])]


class EpochProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with epochs counted from 1 of all: ``Epoch 5/5``."""

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}",
                            refresh=False)
        bar.reset(total=convert_inf(self.total_train_batches))
        bar.initial = 0


class TrainThroughput(pl.Callback):
    """Training images per second, validation excluded, first epoch excluded (warm-up).

    The clock starts before the module's epoch-start hooks, so per-epoch work of a method
    (e.g. a meta-learning pass over the train split) is counted.
    """

    def __init__(self):
        self.epochs: list[tuple[int, float]] = []  # (images, seconds) per epoch
        self._start = 0.0
        self._excluded = 0.0
        self._images = 0
        self._in_epoch = False

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._excluded, self._images = time.perf_counter(), 0.0, 0
        self._in_epoch = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += int(batch["input"].shape[0])

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._in_epoch:  # validation inside a training epoch (not the sanity check)
            self._excluded += time.perf_counter() - self._val_start

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._in_epoch = False
        seconds = time.perf_counter() - self._start - self._excluded
        self.epochs.append((self._images * trainer.world_size, seconds))

    def summary(self) -> dict[str, float]:
        timed = self.epochs[1:] or self.epochs
        images = sum(n for n, _ in timed)
        seconds = sum(s for _, s in timed)
        return {"train_images_per_s": round(images / seconds, 2) if seconds else None,
                "epoch_seconds": [round(s, 3) for _, s in self.epochs],
                "epoch_images": [n for n, _ in self.epochs]}


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class RunEstimate(pl.Callback):
    """After the first epoch a process trains, one line (rank 0 only): how long the epoch
    took, training and validation included, and the estimated time of the whole run.

    The estimate is that epoch's time times the run's epochs (a resumed run: times the epochs
    left). The first epoch carries some one-off costs (warm-up, a method's first pass), so it
    errs on the long side.
    """

    def __init__(self, label: str = "run"):
        self.label = label
        self._start: float | None = None
        self.reported: str | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.reported is not None or self._start is None or not trainer.is_global_zero:
            return
        seconds = time.perf_counter() - self._start
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        line = f"{self.label}: epoch {epoch} took {_duration(seconds)}"
        if total is not None and total > 0:
            left = max(total - epoch, 0) * seconds
            done_at = time.strftime("%H:%M", time.localtime(time.time() + left))
            line += (f" (training + validation); estimated {_duration(seconds * total)} for all "
                     f"{total} epochs, {_duration(left)} from now (around {done_at})")
        self.reported = line
        log.info(line)
