"""Datamodules yielding {input, target, index} with train / meta / val / test splits."""

from .base import ArrayDataset, SplitDataModule
from .cifar import Cifar10DataModule, Cifar100DataModule
from .digits import DigitsDataModule
from .download import DatasetError
from .fashion_mnist import FashionMnistDataModule
from .noise import NOISE_TYPES, apply_label_noise
from .synthetic import SyntheticDataModule

__all__ = ["ArrayDataset", "Cifar10DataModule", "Cifar100DataModule", "DatasetError",
           "DigitsDataModule", "FashionMnistDataModule", "NOISE_TYPES", "SplitDataModule",
           "SyntheticDataModule", "apply_label_noise"]
