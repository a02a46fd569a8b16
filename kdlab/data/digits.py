"""scikit-learn's bundled 8x8 handwritten digits: the offline default dataset.

1797 images, 10 classes, pixel values 0..16 scaled to [0, 1], shape (1, 8, 8). The
train/test split is stratified and fixed by ``split_seed`` (default 0) so every run is
tested on the same examples; meta/val are then held out of the train part from the seed.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from .base import SplitDataModule


class DigitsDataModule(SplitDataModule):
    name = "digits"
    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, test_fraction: float = 0.2, split_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.test_fraction = float(test_fraction)
        self.split_seed = int(split_seed)

    def load(self):
        digits = load_digits()
        x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(digits.target, dtype=torch.long)
        train, test = train_test_split(np.arange(len(y)), test_size=self.test_fraction,
                                       stratify=digits.target, random_state=self.split_seed)
        train, test = np.sort(train), np.sort(test)
        return {"train_inputs": x[train], "train_targets": y[train],
                "test_inputs": x[test], "test_targets": y[test]}
