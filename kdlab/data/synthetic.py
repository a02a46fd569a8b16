"""Controlled synthetic classification (ALM-KD's synthetic setting, the authors' generator).

scikit-learn ``make_classification``: 10,000 samples, 14 features, all informative, 20
classes, one cluster per class, no label flipping (``flip_y=0``: scikit-learn's default
0.01 would put wrong labels into the clean meta, val and test splits), generated from
``data_seed`` so the data never depends on the run seed; a fixed stratified test split;
features standardised with train statistics.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import make_classification
from sklearn.model_selection import train_test_split

from .base import SplitDataModule


class SyntheticDataModule(SplitDataModule):
    name = "synthetic"

    def __init__(self, n_samples: int = 10_000, n_features: int = 14, n_informative: int = 14,
                 n_redundant: int = 0, n_classes: int = 20, n_clusters_per_class: int = 1,
                 class_sep: float = 1.0, flip_y: float = 0.0, test_fraction: float = 0.2,
                 data_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.gen = dict(n_samples=int(n_samples), n_features=int(n_features),
                        n_informative=int(n_informative), n_redundant=int(n_redundant),
                        n_classes=int(n_classes), n_clusters_per_class=int(n_clusters_per_class),
                        class_sep=float(class_sep), flip_y=float(flip_y),
                        random_state=int(data_seed))
        self.num_classes = int(n_classes)
        self.input_shape = (int(n_features),)
        self.test_fraction = float(test_fraction)
        self.data_seed = int(data_seed)

    def load(self):
        x, y = make_classification(**self.gen)
        train, test = train_test_split(np.arange(len(y)), test_size=self.test_fraction,
                                       stratify=y, random_state=self.data_seed)
        mean, std = x[train].mean(0), x[train].std(0) + 1e-8
        x = torch.tensor((x - mean) / std, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.long)
        return {"train_inputs": x[np.sort(train)], "train_targets": y[np.sort(train)],
                "test_inputs": x[np.sort(test)], "test_targets": y[np.sort(test)]}
