"""Image datasets held in memory as uint8 and prepared in batches on the device.

``UInt8ImageDataModule`` is the shared part of CIFAR and Fashion-MNIST: the stored images
stay uint8 (N, C, H, W); ``preprocess`` normalises each batch after it reached the device
and, for training batches with ``augment``, first applies the random crop of the image
zero-padded by ``padding`` + horizontal flip (``augment.py``), reporting which of the
finitely many crop + flip outputs each example got (``batch["view"]``) so that
``teacher_cache=views`` can look up the teachers' logits of exactly that view.
"""

from __future__ import annotations

from torch import Tensor

from ..errors import ConfigError
from .augment import crop_flip, crop_flip_views, normalize, random_crop_flip, view_ids, view_params
from .base import SplitDataModule


class UInt8ImageDataModule(SplitDataModule):
    """Subclasses set ``mean``, ``std`` (per channel, of the [0, 1] images) and ``load()``
    returning uint8 images."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, augment: bool = True, padding: int = 4, **kwargs):
        super().__init__(**kwargs)
        if int(padding) < 0 or int(padding) != padding:
            raise ConfigError(f"dataset.padding must be a whole number >= 0, got {padding}")
        self.augment = bool(augment)
        self.padding = int(padding)
        self.deterministic_train = not self.augment

    def preprocess(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        x = batch["input"]
        if not (train and self.augment):
            return {**batch, "input": normalize(x, self.mean, self.std)}
        x, offsets, flips = random_crop_flip(x, padding=self.padding, return_params=True)
        # which of the finitely many crop + flip outputs each example got (teacher_cache=views)
        return {**batch, "input": normalize(x, self.mean, self.std),
                "view": view_ids(offsets, flips, self.padding)}

    @property
    def augmentation_views(self) -> int:
        return crop_flip_views(self.padding) if self.augment else 0

    def train_view(self, index: Tensor, views: Tensor, device) -> Tensor:
        """Model inputs of train examples ``index`` as augmented view ``views`` (each)."""
        x = self.splits["train"].inputs[index.cpu()].to(device)
        offsets, flips = view_params(views.to(device), self.padding)
        return normalize(crop_flip(x, offsets, flips, self.padding), self.mean, self.std)

    def from_unit_images(self, x: Tensor) -> Tensor:
        return normalize(x * 255.0, self.mean, self.std)
