"""In-memory datamodules with the four kdlab splits.

Every dataset is held as tensors (inputs, targets). ``setup`` splits the training set into
``train`` (labels possibly noisy), ``meta`` (a clean, stratified held-out fraction of the
training set) and a separate clean ``val`` (``val_fraction``, default 0.1; with
``val_fraction = 0`` ``val`` is ``meta``). ``train_on_meta`` appends the clean meta examples
to ``train`` (so a baseline trains on the same clean data a meta-learning method sees; needs
a separate val).
``test`` is the dataset's own test set. Model selection uses ``val``, never ``test``.

Batches are dicts ``{input, target, index}``: ``index`` is the example's position in its
split (for ``train``: the row of per-example method state such as ALM-KD's weight table).
Batches are cut by indexing the tensors directly (no per-sample collation), and the
sampler shards batches across DDP ranks itself, deterministically from (seed, epoch), so
every rank sees the same permutation and resumes reproduce the data order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import ConfigError
from .noise import apply_label_noise, check_noise


@dataclass(frozen=True)
class SplitPlan:
    """Positions (in the training set) of the train, meta and val examples (``val`` None: val
    is meta), and the train split's labels in its row order: ``train_targets`` (after label
    noise), ``train_clean`` and ``noise_mask`` (the rows whose label the noise changed)."""

    train: np.ndarray
    meta: np.ndarray
    val: np.ndarray | None
    train_targets: Tensor
    train_clean: Tensor
    noise_mask: Tensor


class ArrayDataset(Dataset):
    """Tensors indexed a whole batch at a time: ``ds[list_of_positions] -> batch dict``."""

    def __init__(self, inputs: Tensor, targets: Tensor, clean_targets: Tensor | None = None):
        if len(inputs) != len(targets):
            raise ConfigError("inputs and targets differ in length")
        self.inputs = inputs
        self.targets = targets
        self.clean_targets = targets if clean_targets is None else clean_targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, positions) -> dict[str, Tensor]:
        index = torch.as_tensor(positions, dtype=torch.long)
        return {"input": self.inputs[index], "target": self.targets[index], "index": index}


def _distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BatchSampler(Sampler[list[int]]):
    """Yields lists of positions; shuffles from (seed, epoch) and shards over DDP ranks.

    All ranks draw the same permutation; rank r takes its examples r, r + world, ... of it
    and cuts them into batches of ``batch_size`` (so the global batch is world x
    batch_size). With ``drop_last`` every rank gets the same number of full batches.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        self.n, self.batch_size, self.shuffle = n, int(batch_size), shuffle
        self.seed, self.drop_last, self.epoch = int(seed), drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[Tensor]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        rank, world = _distributed_rank_world()
        if world > 1:
            usable = self.n - self.n % world if self.drop_last else self.n
            order = order[rank:usable:world]
        batches = list(order.split(self.batch_size))
        if self.drop_last and len(batches) > 1 and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self):
        for b in self._batches():
            yield b.tolist()

    def __len__(self) -> int:
        return len(self._batches())


class SplitDataModule(pl.LightningDataModule):
    """Base for all kdlab datasets. Subclasses implement ``load()``.

    ``load`` returns a dict with ``train_inputs``, ``train_targets``, ``test_inputs``,
    ``test_targets`` (tensors) and optionally ``train_coarse`` (superclass labels, used by
    the CIFAR-100 asymmetric noise).
    """

    name = "dataset"
    asymmetric_class_map: dict[int, int] | None = None  # built-in map for noise=asymmetric
    has_coarse_labels = False  # superclass labels (load() returns train_coarse): CIFAR-100
    train_views: tuple[str, ...] = ()  # extra views of training batches (set at fit start)
    # True when a train example always reaches the model as the same tensor (no random
    # augmentation): per-example teacher outputs can then be computed once and cached.
    deterministic_train: bool = True
    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(self, batch_size: int = 64, eval_batch_size: int | None = None,
                 meta_fraction: float = 0.1, val_fraction: float = 0.1,
                 train_on_meta: bool = False, num_workers: int = 0, noise: dict | None = None,
                 seed: int = 0, recipe: dict | None = None):
        super().__init__()
        if not 0.0 < float(meta_fraction) < 1.0:
            raise ConfigError(f"dataset.meta_fraction must be in (0, 1), got {meta_fraction}")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"dataset.val_fraction must be in [0, 1), got {val_fraction}")
        if float(meta_fraction) + float(val_fraction) >= 1.0:
            raise ConfigError("dataset.meta_fraction + dataset.val_fraction must be < 1 (the "
                              f"rest is the train split), got {meta_fraction} + {val_fraction}")
        if int(batch_size) < 1:
            raise ConfigError(f"dataset.batch_size must be >= 1, got {batch_size}")
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or max(256, batch_size))
        self.recipe = dict(recipe or {})  # read by the config (optimizer, schedule, teachers)
        self.meta_fraction = float(meta_fraction)
        self.val_fraction = float(val_fraction)
        if train_on_meta and self.val_fraction == 0:
            raise ConfigError("dataset.train_on_meta=true needs a separate validation split "
                              "(dataset.val_fraction > 0): model selection must not use "
                              "examples the model was trained on")
        self.train_on_meta = bool(train_on_meta)
        self.num_workers = int(num_workers)
        self.noise = dict(noise or {"type": "none", "rate": 0.0})
        check_noise(self.noise.get("type", "none"), self.noise.get("rate", 0.0))
        self.seed = int(seed)
        self.splits: dict[str, ArrayDataset] = {}
        self.noise_mask: Tensor | None = None
        self.class_map: dict | None = None

    # -- to implement ----------------------------------------------------------------------
    def load(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap checks before any work (e.g. data present when downloads are off)."""
        if (self.noise.get("type") == "asymmetric" and not self.noise.get("class_map")
                and not self.asymmetric_class_map and not self.has_coarse_labels):
            raise ConfigError(f"noise=asymmetric needs a class map for {self.name}: set "
                              "noise.class_map={src: dst, ...} (built in for CIFAR-10, "
                              "CIFAR-100 and Fashion-MNIST)")

    # -- splits ----------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        data = self.load()
        x, y = data["train_inputs"], data["train_targets"].long()
        plan = self.split_plan(y, data.get("train_coarse"))
        self.noise_mask = plan.noise_mask
        self.splits["train"] = ArrayDataset(x[plan.train], plan.train_targets,
                                            clean_targets=plan.train_clean)
        self.splits["meta"] = ArrayDataset(x[plan.meta], y[plan.meta])
        self.splits["val"] = (ArrayDataset(x[plan.val], y[plan.val]) if plan.val is not None
                              else self.splits["meta"])
        self.splits["test"] = ArrayDataset(data["test_inputs"], data["test_targets"].long())

    def split_plan(self, labels: Tensor, coarse: Tensor | None = None) -> SplitPlan:
        """Which examples of a training set with ``labels`` go to train, meta and val, and
        the train split's labels after label noise (from the seed; see ``SplitPlan``)."""
        positions = np.arange(len(labels))
        train_pos, meta_pos = _stratified_split(positions, labels, self.meta_fraction, self.seed)
        val_pos = None
        if self.val_fraction > 0:
            frac = self.val_fraction / (1.0 - self.meta_fraction)
            train_pos, val_pos = _stratified_split(train_pos, labels, frac, self.seed + 1)
        clean = labels[train_pos]
        noise = dict(self.noise)
        noise["class_map"] = noise.get("class_map") or self.asymmetric_class_map
        noisy, mask = apply_label_noise(
            clean, num_classes=self.num_classes, seed=self.seed,
            coarse=None if coarse is None else coarse[train_pos], **noise)
        if self.train_on_meta:  # the clean meta examples join training, labels untouched
            noisy = torch.cat([noisy, labels[meta_pos]])
            clean = torch.cat([clean, labels[meta_pos]])
            mask = torch.cat([mask, torch.zeros(len(meta_pos), dtype=torch.bool)])
            train_pos = np.concatenate([train_pos, meta_pos])
        return SplitPlan(train_pos, meta_pos, val_pos, noisy, clean, mask)

    def use_clean_labels(self, split: str) -> None:
        """Give ``split`` its clean labels (``kdlab eval labels=clean``)."""
        self.setup()
        chosen = self.splits[split]
        self.splits[split] = ArrayDataset(chosen.inputs, chosen.clean_targets)

    @property
    def train_size(self) -> int:
        self.setup()
        return len(self.splits["train"])

    @property
    def realised_noise_rate(self) -> float:
        self.setup()
        return float(self.noise_mask.float().mean()) if len(self.noise_mask) else 0.0

    # -- loaders ---------------------------------------------------------------------------
    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        self.setup()
        ds = self.splits[split]
        sampler = BatchSampler(len(ds), batch_size, shuffle, self.seed, drop_last)
        # A generator of its own: a DataLoader iterator draws its base seed from it, not from
        # the global RNG, whose state at each epoch start must depend only on (seed, epoch)
        # for an exact resume (dropout, random methods).
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True, drop_last=True)

    def eval_dataloader(self, split: str) -> DataLoader:
        """All of ``split`` in order, in evaluation batches."""
        return self._loader(split, self.eval_batch_size, shuffle=False, drop_last=False)

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader("test")

    # -- device-side preprocessing ---------------------------------------------------------
    def preprocess(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        """Turn stored inputs into model inputs on the device (augmentation goes here).

        Lightning applies it to the loaders it runs; batches a method draws itself (meta
        batches, train passes without augmentation) go through ``model_batch``.
        """
        return batch

    def model_batch(self, batch: dict[str, Tensor], device, train: bool = False):
        """Move a batch from one of this module's loaders to ``device`` and preprocess it."""
        moved = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        return self.preprocess(moved, train=train)

    def examples(self, split: str, index: Tensor | None, device) -> dict[str, Tensor]:
        """Un-augmented examples of ``split`` at positions ``index`` (default: all of it), as
        a model batch ``{input, target, index}`` on ``device``."""
        ds = self.splits[split]
        index = torch.arange(len(ds)) if index is None else index.cpu()
        return self.model_batch(ds[index], device, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        training = self.trainer is not None and self.trainer.training
        out = self.preprocess(batch, train=training)
        if training:
            for view in self.train_views:
                out[f"input_{view}"] = self.view(view, batch["input"])
        return out

    # -- the finite set of augmented views (teacher_cache=views) ---------------------------
    @property
    def augmentation_views(self) -> int:
        """How many distinct outputs the train augmentation has when it is a finite set whose
        choice preprocess reports in ``batch["view"]`` (crop + flip: 162); 0 otherwise."""
        return 0

    def train_view(self, index: Tensor, views: Tensor, device) -> Tensor:
        raise NotImplementedError(f"{self.name} has no enumerable augmentation")

    # -- extra views of training batches (methods ask for them: Method.input_views) --------
    VIEWS = ("strong",)

    def check_views(self, views: tuple[str, ...]) -> None:
        for view in views:
            if view not in self.VIEWS:
                raise ConfigError(f"unknown input view {view!r}; datasets offer "
                                  f"{', '.join(self.VIEWS)}")
            if len(self.input_shape) != 3:
                raise ConfigError(f"the {view} view (RandAugment + Cutout) needs image inputs; "
                                  f"{self.name} has vectors of shape {tuple(self.input_shape)}")

    def unit_images(self, x: Tensor) -> Tensor:
        """Stored image inputs as floats in [0, 1] (uint8 images are divided by 255)."""
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def from_unit_images(self, x: Tensor) -> Tensor:
        """Float images in [0, 1] -> model inputs (normalisation goes here)."""
        return x

    def view(self, name: str, inputs: Tensor) -> Tensor:
        """Model inputs of view ``name`` for stored (unaugmented) training inputs."""
        from .augment import strong_view

        return self.from_unit_images(strong_view(self.unit_images(inputs)))

    def hash_train_inputs(self, h) -> None:
        """Feed what the train split's inputs are to the hash ``h`` (a teacher-logit cache's
        key): here their bytes."""
        h.update(self.splits["train"].inputs.detach().cpu().contiguous().reshape(-1)
                 .view(torch.uint8).numpy())

    def data_report(self) -> dict[str, Any]:
        """What results.json says about the data read during the run (``data``); nothing
        for data held in memory."""
        return {}

    def describe(self) -> dict[str, Any]:
        self.setup()
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "noise": {"type": self.noise.get("type", "none"),
                      "rate": float(self.noise.get("rate", 0.0)),
                      "realised_rate": self.realised_noise_rate},
        }


def _stratified_split(positions: np.ndarray, labels: Tensor, fraction: float, seed: int):
    """Split ``positions`` into (rest, held_out) with ``fraction`` held out, per class.

    Falls back to a plain seeded split when stratifying is impossible (a class with a single
    example, or fewer held-out examples than classes).
    """
    y = labels[torch.as_tensor(positions)].numpy()
    n_held = int(math.ceil(fraction * len(positions)))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and n_held >= (counts > 0).sum() else None
    rest, held = train_test_split(positions, test_size=n_held, stratify=stratify,
                                  random_state=seed)
    return np.sort(rest), np.sort(held)
