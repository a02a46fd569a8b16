"""Datamodules yielding {input, target, index} with train / meta / val / test splits."""

from .base import ArrayDataset, SplitDataModule
from .noise import NOISE_TYPES, apply_label_noise

__all__ = ["ArrayDataset", "NOISE_TYPES", "SplitDataModule", "apply_label_noise"]
