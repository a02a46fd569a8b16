"""Tiny real runs: overrides that make a run take a second, and fits of the real module."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from kdlab.data import instantiate_datamodule
from kdlab.module import DistillModule
from kdlab.pipeline import trained_teachers
from kdlab.train import build_module
from kdlab.trainer import build_trainer

FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "num_threads=1"]


def module_for(cfg) -> tuple[DistillModule, object]:
    """(module, datamodule) exactly as kdlab.train.run builds them (auto-trained teachers
    trained first, as kdlab.pipeline does)."""
    dm = instantiate_datamodule(cfg)
    dm.setup()
    return build_module(cfg, dm, trained_teachers(cfg)), dm


def fit(cfg, run_dir: Path, callbacks=(), ckpt_path=None) -> DistillModule:
    """A real fit of ``cfg`` in ``run_dir`` (no testing, no results.json)."""
    module, dm = module_for(cfg)
    trainer = build_trainer(cfg, Path(run_dir), list(callbacks))
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=False)
    return module


class StopAfter(pl.Callback):
    """Interrupt the fit after ``epochs`` epochs, as a killed job would be."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def fit_checkpointed(cfg, run_dir: Path, ckpt_path=None, stop_after=None) -> DistillModule:
    """A fit that saves ``checkpoints/last.ckpt`` (stopped after ``stop_after`` epochs)."""
    callbacks = [ModelCheckpoint(dirpath=Path(run_dir) / "checkpoints", save_last=True)]
    if stop_after:
        callbacks.append(StopAfter(stop_after))
    return fit(cfg, run_dir, callbacks, ckpt_path=ckpt_path)


# The ``method._target_`` a run's config.yaml holds, for hand-made runs: the report finds what a
# method declares for it (``report_plots``, ``run_plots``, ``report_metrics``) through it.
METHOD_TARGETS = {"alm_kd": "kdlab.methods.alm_kd.ALMKD", "tgeo_kd": "kdlab.methods.tgeo_kd.TGeoKD",
                  "kd": "kdlab.methods.kd.KD", "ce": "kdlab.methods.ce.CE"}


def write_run(d: Path, config: dict, results: dict) -> Path:
    """A run directory as train.py leaves it (config.yaml + results.json), without Hydra or
    training: for tests of what reads runs (kdlab report)."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / "results.json").write_text(json.dumps(results))
    return d
