"""Experiment loggers: built from the ``logger`` config group, finalised after the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig


def build_loggers(cfg: DictConfig, output_dir: Path) -> list:
    """One Lightning logger per entry of ``cfg.logger`` (csv, tensorboard, wandb, ...)."""
    return [instantiate(node, save_dir=str(output_dir)) for node in (cfg.logger or {}).values()]


def finalize_loggers(loggers: list, cfg: DictConfig, results: dict[str, Any],
                     output_dir: Path) -> None:
    """Hand the finished run's results and plots to loggers that can show them."""
    for logger in loggers:
        logger.finalize("success")
