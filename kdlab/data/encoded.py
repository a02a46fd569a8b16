"""Datamodules over encoded images (JPEG, PNG) addressed by global id, for datasets beyond
memory: the shared part of ``dataset=imagefolder`` (``imagefolder.py``: a class-per-folder
tree read as it is) and ``dataset=streaming`` (``streaming.py``: LitData chunks written by
``kdlab data prepare``).

Ids, splits and labels. Every example of a source (a tree, or the chunks prepared from one)
has a **global id**: its position in the source's sorted (class, file) list, the same in
every run. What is known without reading images -- the classes, each id's label and file
name -- is the source's ``Catalog``. ``setup`` holds the splits out by id, as the in-memory
datasets do by position: ``test`` is ``test_path`` (a second source with the same classes,
e.g. ImageNet's val), or else a ``test_fraction`` of the ids, stratified and fixed by
``split_seed``; of the rest, ``meta`` and ``val`` are held out stratified from the run seed
and ``train`` gets the label noise of the seed (``SplitDataModule.split_plan``). Nothing is
rewritten: a split is a list of ids (``IdSplit``) and its labels.

Batches keep kdlab's contract: ``{input, target, index}`` plus ``id``. ``index`` is the
example's **row in its split** (0..len-1, for train 0..train_size-1), as for every kdlab
dataset, so that per-example method state (ALM-KD's weights, PS-KD's predictions, CRD's
memory) is sized by the train split and works unchanged; ``id`` is the example's global id,
which a split maps to its row with a lookup table (``IdSplit.tables``: one int64 per id of
the source). Tables sized by the id count instead would grow every method's state by the
held-out examples and break methods that draw train rows 0..N-1 (ALM-KD's chunks).

Decoding and views (``image_views.py``): ``decode=workers`` decodes and cuts each view in
the loader's workers (``num_workers``), batches arrive as uint8 views; ``decode=device``
sends the encoded bytes and decodes a whole batch on the training device in
``on_before_batch_transfer`` (nvJPEG on a GPU); ``auto``: device on a GPU, workers
otherwise. Normalisation is on the device either way (``preprocess``). Training batches get
the RandomResizedCrop + flip view (``augment=false``: the evaluation view), every other
batch resize + centre crop.

An image that cannot be decoded is counted, never dropped: its example keeps its place with
a mid-grey image, a warning names the file the first time, and ``data_report`` (results.json
``data``) gives the count over all ranks and the first file names. The count is part of the
checkpoint's datamodule state, so a resumed run reports what the whole run found.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError
from .augment import normalize
from .base import BatchSampler, SplitDataModule, _stratified_split
from .download import DatasetError
from .image_views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewSpec,
    as_bytes_tensor,
    decode_image,
    decode_images,
    stack_views,
    view,
)

log = logging.getLogger("kdlab")

DECODE_MODES = ("auto", "workers", "device")
REPORTED_FILES = 10  # unreadable files named in results.json


@dataclass(frozen=True)
class Catalog:
    """A source's examples without their images: ``labels[id]``, ``files[id]`` (the file
    under ``file_root`` it was read from, for messages) and the ``classes``; ``origin`` says
    where the source is (a path or URL) and ``digest`` identifies its content (teacher-cache
    keys)."""

    origin: str
    classes: tuple[str, ...]
    labels: np.ndarray
    files: tuple[str, ...]
    file_root: str
    digest: str

    def file(self, example_id: int) -> str:
        return f"{self.file_root}/{self.files[example_id]}"

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class IdSplit:
    """A split as ids of a source (``"train"``: ``path``, ``"test"``: ``test_path``): row r
    is example ``ids[r]`` with label ``targets[r]`` (after label noise for train)."""

    source: str
    ids: Tensor
    targets: Tensor
    clean_targets: Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def tables(self, size: int) -> tuple[Tensor, Tensor]:
        """(row by id, label by id) over a source of ``size`` ids; -1 where not in the split."""
        rows = torch.full((size,), -1, dtype=torch.long)
        rows[self.ids] = torch.arange(len(self.ids))
        targets = torch.full((size,), -1, dtype=torch.long)
        targets[self.ids] = self.targets
        return rows, targets


def encoded_example(example_id: int, data: bytes | Tensor, spec: ViewSpec | None,
                    epoch: int) -> dict[str, Any]:
    """One example as a loader worker hands it over: its view (decoded on the CPU; None
    when unreadable) or, with ``spec`` None, its encoded bytes for the device."""
    encoded = as_bytes_tensor(data)
    if spec is None:
        return {"id": example_id, "encoded": encoded}
    image = decode_image(encoded)
    return {"id": example_id,
            "image": None if image is None else view(image, spec, epoch, example_id)}


class EncodedBatch:
    """The loaders' collate function: examples -> ``{input | encoded, unreadable, target,
    index, id, source}``, the split's rows and labels looked up by id (picklable into
    workers); ``unreadable`` and ``source`` leave the batch before it reaches the model."""

    def __init__(self, split: IdSplit, source_size: int, crop_size: int,
                 mean: tuple[float, ...]):
        self.rows, self.targets = split.tables(source_size)
        self.source, self.crop_size, self.mean = split.source, crop_size, tuple(mean)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = torch.tensor([e["id"] for e in examples], dtype=torch.long)
        batch: dict[str, Any] = {"target": self.targets[ids], "index": self.rows[ids],
                                 "id": ids, "source": self.source}
        if "encoded" in examples[0]:
            batch["encoded"] = [e["encoded"] for e in examples]
        else:
            batch["input"], batch["unreadable"] = stack_views(
                [e["image"] for e in examples], self.crop_size, self.mean)
        return batch


class EpochBatchSampler(BatchSampler):
    """``BatchSampler``'s batches, each with the epoch it belongs to: ``(epoch, rows)``."""

    def __iter__(self):
        for rows in super().__iter__():
            yield self.epoch, rows


class IdBatches(Dataset):
    """``dataset[(epoch, rows)]`` -> the batch of those rows of a split, each example read
    by id with ``read`` and turned into its view (``spec``) or left encoded (None)."""

    def __init__(self, split: IdSplit, read: Callable[[int], bytes | Tensor],
                 spec: ViewSpec | None, collate: EncodedBatch):
        self.ids, self.read, self.spec, self.collate = split.ids.tolist(), read, spec, collate

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: tuple[int, list[int]]) -> dict[str, Any]:
        epoch, rows = item
        return self.collate([encoded_example(self.ids[r], self.read(self.ids[r]), self.spec,
                                             epoch) for r in rows])


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"dataset.{name} must be a whole number >= 1, got {value!r}")
    return value


def _interval(name: str, value: Any, high: float | None) -> tuple[float, float]:
    try:
        low_v, high_v = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"dataset.{name} must be two numbers [low, high], got {value!r}") \
            from None
    if not 0 < low_v <= high_v or (high is not None and high_v > high):
        bound = f" <= {high}" if high is not None else ""
        raise ConfigError(f"dataset.{name} must satisfy 0 < low <= high{bound}, got "
                          f"{list(value)}")
    return low_v, high_v


class EncodedImageDataModule(SplitDataModule):
    """Base of ``ImageFolderDataModule`` and ``StreamingDataModule`` (see the module
    docstring). Subclasses implement ``read_catalog`` and ``reader``; every split is read by
    id (``make_loader``) unless a subclass streams it otherwise."""

    deterministic_train = False
    source_kind = "source"  # what `path` is, in messages

    def __init__(self, path: str, test_path: str | None = None, test_fraction: float = 0.1,
                 split_seed: int = 0, crop_size: int = 224, resize_size: int = 256,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), augment: bool = True,
                 decode: str = "auto", mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, **kwargs):
        super().__init__(**kwargs)
        if not path:
            raise ConfigError(f"dataset.path is not set: give the {self.source_kind} "
                              f"(dataset.path=...)")
        self.path, self.test_path = str(path), (str(test_path) if test_path else None)
        self.test_fraction, self.split_seed = float(test_fraction), int(split_seed)
        if self.test_path is None and not 0 < self.test_fraction < 1:
            raise ConfigError(f"dataset.test_fraction must be in (0, 1) without a "
                              f"dataset.test_path, got {test_fraction}")
        self.crop_size = _positive_int("crop_size", crop_size)
        self.resize_size = _positive_int("resize_size", resize_size)
        if self.resize_size < self.crop_size:
            raise ConfigError(f"dataset.resize_size ({resize_size}) must be >= "
                              f"dataset.crop_size ({crop_size}): the evaluation view is the "
                              "centre crop of the resized image")
        self.scale = _interval("scale", scale, 1.0)
        self.ratio = _interval("ratio", ratio, None)
        if decode not in DECODE_MODES:
            raise ConfigError(f"dataset.decode must be one of {', '.join(DECODE_MODES)}, got "
                              f"{decode!r}")
        self.decode = decode
        self.augment = bool(augment)
        self.deterministic_train = not self.augment
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("dataset.mean and dataset.std must be 3 numbers each (RGB), the "
                              f"std > 0; got {list(mean)} and {list(std)}")
        self.splits: dict[str, IdSplit] = {}  # type: ignore[assignment]
        self.unreadable: set[tuple[str, int]] = set()  # (source, id) of undecodable images
        self._catalogs: dict[str, Catalog] = {}

    # -- to implement ----------------------------------------------------------------------
    def read_catalog(self, source: str) -> Catalog:
        """The catalog of ``source`` ("train": ``path``, "test": ``test_path``)."""
        raise NotImplementedError

    def reader(self, source: str) -> Callable[[int], bytes | Tensor]:
        """``read(id)`` -> the encoded bytes of example ``id`` of ``source`` (random access;
        picklable into loader workers)."""
        raise NotImplementedError

    # -- reading by id -----------------------------------------------------------------------
    def read_encoded(self, source: str, ids: list[int]) -> list[Tensor]:
        read = self.reader(source)
        return [as_bytes_tensor(read(i)) for i in ids]

    def make_loader(self, split: IdSplit, spec: ViewSpec | None, batch_size: int,
                    shuffle: bool, drop_last: bool, collate: EncodedBatch) -> DataLoader:
        """A loader of ``split`` read by id: batches of its rows from ``base.BatchSampler``
        (shuffled from (seed, epoch), sharded over DDP ranks: rank r takes the rows r,
        r + world, ... of the permutation), each read, decoded (``spec``; None: on the
        device) and collated in one of ``num_workers`` loader workers or the main process.
        Order and views depend on (seed, epoch) only: an exact resume for free."""
        dataset = IdBatches(split, self.reader(split.source), spec, collate)
        sampler = EpochBatchSampler(len(split), batch_size, shuffle, self.seed, drop_last)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    # -- what the data is --------------------------------------------------------------------
    def catalog(self, source: str = "train") -> Catalog:
        if source not in self._catalogs:
            self._catalogs[source] = self.read_catalog(source)
        return self._catalogs[source]

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.catalog().classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.catalog().classes

    @property
    def input_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return (3, self.crop_size, self.crop_size)

    def check(self) -> None:
        super().check()
        train = self.catalog("train")
        if self.test_path is not None and self.catalog("test").classes != train.classes:
            test = self.catalog("test")
            differ = sorted(set(train.classes) ^ set(test.classes))[:3]
            raise DatasetError(
                f"dataset.test_path {self.test_path} has other classes than dataset.path "
                f"{self.path} ({len(test.classes)} vs {len(train.classes)}; e.g. "
                f"{', '.join(differ) or 'the same names in another order'}): both need the "
                "same class folders")

    # -- splits by id ----------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train = self.catalog("train")
        labels = torch.from_numpy(train.labels)
        pool = np.arange(len(train))
        if self.test_path is None:
            pool, test_ids = _stratified_split(pool, labels, self.test_fraction,
                                               self.split_seed)
            test = IdSplit("train", torch.from_numpy(test_ids), labels[test_ids],
                           labels[test_ids])
        else:
            test_labels = torch.from_numpy(self.catalog("test").labels)
            test = IdSplit("test", torch.arange(len(test_labels)), test_labels, test_labels)
        plan = self.split_plan(labels[pool])

        def held_out(positions: np.ndarray) -> IdSplit:
            ids = torch.from_numpy(pool[positions])
            return IdSplit("train", ids, labels[ids], labels[ids])

        self.noise_mask = plan.noise_mask
        self.splits["train"] = IdSplit("train", torch.from_numpy(pool[plan.train]),
                                       plan.train_targets, plan.train_clean)
        self.splits["meta"] = held_out(plan.meta)
        self.splits["val"] = held_out(plan.val) if plan.val is not None else self.splits["meta"]
        self.splits["test"] = test

    def use_clean_labels(self, split: str) -> None:
        self.setup()
        chosen = self.splits[split]
        self.splits[split] = IdSplit(chosen.source, chosen.ids, chosen.clean_targets,
                                     chosen.clean_targets)

    # -- loaders ---------------------------------------------------------------------------
    def view_spec(self, train: bool) -> ViewSpec:
        return ViewSpec(train=train and self.augment, crop_size=self.crop_size,
                        resize_size=self.resize_size, scale=self.scale, ratio=self.ratio,
                        seed=self.seed)

    def decode_device(self) -> torch.device | None:
        """Where batches are decoded when not in the loader's workers: the training device
        (``decode=device``, or ``auto`` on a GPU); None: in the workers."""
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self.decode == "device" or (self.decode == "auto" and device.type == "cuda"):
            return device
        return None

    def _loader(self, split: str, batch_size: int, shuffle: bool, drop_last: bool
                ) -> DataLoader:
        self.setup()
        chosen = self.splits[split]
        spec = None if self.decode_device() is not None else self.view_spec(train=shuffle)
        collate = EncodedBatch(chosen, len(self.catalog(chosen.source)), self.crop_size,
                               self.mean)
        return self.make_loader(chosen, spec, batch_size, shuffle, drop_last, collate)

    # -- batches on their way to the model ---------------------------------------------------
    def decoded(self, batch: dict[str, Any], device: torch.device, train: bool,
                epoch: int) -> dict[str, Any]:
        """A loader's batch with its images decoded (from ``encoded``, on ``device``) and
        its unreadable examples recorded: ``{input, target, index, id}``."""
        batch = dict(batch)
        source = batch.pop("source")
        if "encoded" in batch:
            ids = batch["id"].tolist()
            images = decode_images(batch.pop("encoded"), device)
            spec = self.view_spec(train)
            batch["input"], batch["unreadable"] = stack_views(
                [None if im is None else view(im, spec, epoch, i)
                 for im, i in zip(images, ids, strict=True)], self.crop_size, self.mean, device)
        unreadable = batch.pop("unreadable")
        if bool(unreadable.any()):
            self.record_unreadable(source, batch["id"][unreadable].tolist())
        return batch

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = self.trainer
        return self.decoded(batch, self.decode_device() or torch.device("cpu"),
                            train=trainer.training, epoch=trainer.current_epoch)

    def preprocess(self, batch: dict[str, Tensor], train: bool) -> dict[str, Tensor]:
        return {**batch, "input": normalize(batch["input"], self.mean, self.std)}

    def from_unit_images(self, x: Tensor) -> Tensor:
        return normalize(x * 255.0, self.mean, self.std)

    def model_batch(self, batch: dict[str, Any], device, train: bool = False):
        """A loader's batch (or ``examples``') on ``device``, preprocessed; encoded images
        are decoded there (the main process: nvJPEG on a GPU)."""
        device = torch.device(device)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return super().model_batch(self.decoded(batch, device, train, epoch), device, train)

    def examples(self, split: str, index: Tensor | None, device) -> dict[str, Tensor]:
        self.setup()
        chosen = self.splits[split]
        index = torch.arange(len(chosen)) if index is None else index.cpu().long()
        ids = chosen.ids[index]
        batch = {"encoded": self.read_encoded(chosen.source, ids.tolist()),
                 "target": chosen.targets[index], "index": index, "id": ids,
                 "source": chosen.source}
        return self.model_batch(batch, device, train=False)

    # -- what is recorded --------------------------------------------------------------------
    def record_unreadable(self, source: str, ids: list[int]) -> None:
        catalog = self.catalog(source)
        for i in ids:
            if (source, i) not in self.unreadable:
                log.warning("unreadable image (counted; trained on as a grey image): %s",
                            catalog.file(i))
                self.unreadable.add((source, i))

    def state_dict(self) -> dict[str, Any]:
        return {"unreadable": sorted(self.unreadable)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.unreadable = {(str(s), int(i)) for s, i in state.get("unreadable", [])}

    def data_report(self) -> dict[str, Any]:
        """The images found unreadable, over all ranks: their count and first file names."""
        found = set(self.unreadable)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(found))
            found = {tuple(x) for part in gathered for x in part}
        names = [self.catalog(s).file(i) for s, i in sorted(found)]
        return {"unreadable": len(found), "unreadable_files": names[:REPORTED_FILES]}

    def hash_train_inputs(self, h) -> None:
        h.update(f"{self.catalog().digest}|{self.view_spec(False)}".encode())
        h.update(self.splits["train"].ids.numpy().tobytes())

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "source": self.catalog().origin}


def digest_of(*parts: Any) -> str:
    """A short sha256 of the parts' text (a catalog's content)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    return h.hexdigest()[:24]
