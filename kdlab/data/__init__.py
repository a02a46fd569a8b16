"""Datamodules yielding {input, target, index} with train / meta / val / test splits."""

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ..errors import unwrap_error
from .base import ArrayDataset, SplitDataModule
from .cifar import Cifar10DataModule, Cifar100DataModule
from .digits import DigitsDataModule
from .download import DatasetError
from .fashion_mnist import FashionMnistDataModule
from .noise import NOISE_TYPES, apply_label_noise
from .synthetic import SyntheticDataModule


def instantiate_datamodule(cfg: DictConfig) -> SplitDataModule:
    """The run's datamodule (``cfg.dataset`` with ``cfg.noise`` and ``cfg.seed``), not set
    up: no data read yet."""
    noise = OmegaConf.to_container(cfg.noise, resolve=True)
    try:
        return instantiate(cfg.dataset, noise=noise, seed=int(cfg.seed), _convert_="all")
    except Exception as e:
        raise unwrap_error(e, "dataset") from None


__all__ = ["ArrayDataset", "Cifar10DataModule", "Cifar100DataModule", "DatasetError",
           "DigitsDataModule", "FashionMnistDataModule", "NOISE_TYPES", "SplitDataModule",
           "SyntheticDataModule", "apply_label_noise", "instantiate_datamodule"]
