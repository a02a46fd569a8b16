"""The Lightning Trainer of a run, from ``cfg.trainer``: its precision resolved (``auto``),
kdlab's epoch progress bar unless the user gave a bar, the run's loggers and callbacks, and
checkpoints written atomically."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar

from .callbacks import EpochProgressBar
from .loggers import build_loggers
from .run_dir import AtomicCheckpointIO


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed where the hardware runs it natively, else 32-true."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native else "32-true"


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list) -> pl.Trainer:
    """The Trainer writing into ``output_dir``, with kdlab's ``callbacks`` and the user's
    (``cfg.callbacks``)."""
    user_callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    if cfg.trainer.get("enable_progress_bar", True) and not any(
            isinstance(c, ProgressBar) for c in user_callbacks):
        user_callbacks.append(EpochProgressBar())
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    return instantiate(cfg.trainer, precision=precision,
                       logger=build_loggers(cfg, output_dir) or False,
                       callbacks=callbacks + user_callbacks, plugins=[AtomicCheckpointIO()],
                       default_root_dir=str(output_dir), use_distributed_sampler=False,
                       enable_model_summary=False)
