"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

The archive is downloaded to ``root`` (md5-checked, see ``download.py``) and extracted
there (``root/cifar-10-batches-py`` or ``root/cifar-100-python``); later runs read the
extracted files without touching the network. Images stay uint8 (N, 3, 32, 32) in memory;
``preprocess`` normalises them on the device after transfer and, for training batches with
``augment``, first applies the standard random crop (padding 4) + horizontal flip.
CIFAR-100 also returns the coarse (superclass) labels, which the asymmetric label noise uses.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .augment import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD
from .download import DatasetError, _one_line, download_and_extract
from .images import UInt8ImageDataModule
from .noise import CIFAR10_ASYMMETRIC


def _resolve(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _numpy_core(submodule: str, name: str):
    """``numpy._core.<submodule>.<name>`` (numpy >= 2), else ``numpy.core.<...>`` (numpy 1)."""
    try:
        return _resolve(f"numpy._core.{submodule}", name)
    except (ImportError, AttributeError):
        return _resolve(f"numpy.core.{submodule}", name)


# The only globals a CIFAR pickle needs: numpy array reconstruction (under both the numpy 1
# "numpy.core" and the numpy 2 "numpy._core" names; the official files use the former) and
# the latin1 bytes helper Python 3 writes into protocol-2 pickles.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _resolve("_codecs", "encode"),
}
for _pkg in ("numpy.core", "numpy._core"):
    _ALLOWED_GLOBALS[(f"{_pkg}.multiarray", "_reconstruct")] = (
        lambda: _numpy_core("multiarray", "_reconstruct"))
    _ALLOWED_GLOBALS[(f"{_pkg}.numeric", "_frombuffer")] = (
        lambda: _numpy_core("numeric", "_frombuffer"))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the numpy globals a CIFAR batch file contains."""

    def find_class(self, module: str, name: str):
        make = _ALLOWED_GLOBALS.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a CIFAR file")
        return make()


def read_cifar_batch(path: str | Path) -> dict[str, Any]:
    """Read one CIFAR python-format batch file into a dict with str keys.

    The files are Python 2 pickles of numpy arrays; ``encoding="latin1"`` decodes their
    byte strings (and the raw array buffers) to str. This is the dataset's own format, not a
    torch checkpoint: only files extracted from the official, md5-checked archive (or put
    there by the user) are read, and the unpickler refuses any global other than numpy's
    array reconstruction, so a tampered file cannot run code.
    """
    with open(path, "rb") as f:
        try:
            return _CifarUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
            raise DatasetError(f"cannot read CIFAR file {path}: {_one_line(e)}; delete its "
                               "folder and run again with dataset.download=true to re-extract "
                               "it") from None


def _images(batch: dict[str, Any], path: Path) -> Tensor:
    if not isinstance(batch, dict) or "data" not in batch:
        raise DatasetError(f"CIFAR file {path} is not a batch dict with 'data'; re-extract the "
                           "official archive")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"unexpected 'data' in CIFAR file {path}: dtype {data.dtype}, "
                           f"shape {data.shape} (expected uint8 (N, 3072))")
    return torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))


def _labels(batch: dict[str, Any], key: str) -> Tensor:
    return torch.as_tensor(np.asarray(batch[key], dtype=np.int64))


class _CifarDataModule(UInt8ImageDataModule):
    """Shared download / read / preprocess logic; subclasses set the class attributes."""

    num_classes: int
    input_shape = (3, 32, 32)
    url: str
    md5: str
    folder: str                  # directory the archive extracts to, inside ``root``
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_root: str
    title: str

    def __init__(self, root: str | None = None, download: bool = True, augment: bool = True,
                 padding: int = 4, url: str | None = None, md5: str | None = None, **kwargs):
        # padding 4: the standard CIFAR augmentation (random 32x32 crop of the image padded
        # to 40x40, then a horizontal flip)
        super().__init__(augment=augment, padding=padding, **kwargs)
        self.root = Path(root or self.default_root).expanduser()
        self.download = bool(download)
        if url is not None:
            self.url = str(url)
        if md5 is not None:
            self.md5 = str(md5)

    @property
    def data_dir(self) -> Path:
        """Where the extracted batch files live: ``root/<folder>``."""
        return self.root / self.folder

    def _missing(self) -> list[str]:
        return [f for f in (*self.train_files, *self.test_files)
                if not (self.data_dir / f).is_file()]

    def check(self) -> None:
        super().check()
        if self._missing() and not self.download:
            raise DatasetError(
                f"{self.title} not found: expected the extracted '{self.folder}' folder at "
                f"{self.data_dir} (missing {', '.join(self._missing())}); set "
                f"dataset.download=true, or download {self.url} and extract it into "
                f"{self.root}")

    def prepare_data(self) -> None:
        """Download and extract if needed (Lightning calls this once per node first)."""
        if not self._missing():
            return
        self.check()
        download_and_extract(self.url, self.md5, self.root)
        missing = self._missing()
        if missing:
            raise DatasetError(f"the archive from {self.url} did not contain "
                               f"{', '.join(missing)} under {self.data_dir}; check dataset.url")

    def _read(self, files: tuple[str, ...]) -> tuple[Tensor, dict[str, Tensor]]:
        images, labels = [], {}
        for name in files:
            path = self.data_dir / name
            batch = read_cifar_batch(path)
            images.append(_images(batch, path))
            for key in self._label_keys():
                if key not in batch:
                    raise DatasetError(f"CIFAR file {path} has no '{key}' labels")
                labels.setdefault(key, []).append(_labels(batch, key))
        return torch.cat(images), {k: torch.cat(v) for k, v in labels.items()}

    def _label_keys(self) -> tuple[str, ...]:
        return (self.label_key,)

    def load(self) -> dict[str, Tensor]:
        self.prepare_data()
        train_x, train_y = self._read(self.train_files)
        test_x, test_y = self._read(self.test_files)
        out = {"train_inputs": train_x, "train_targets": train_y[self.label_key],
               "test_inputs": test_x, "test_targets": test_y[self.label_key]}
        for split, y in (("train", out["train_targets"]), ("test", out["test_targets"])):
            if len(y) and not 0 <= int(y.min()) <= int(y.max()) < self.num_classes:
                raise DatasetError(f"{self.title} {split} labels outside 0..{self.num_classes - 1}"
                                   f" in {self.data_dir}; re-extract the official archive")
        for key, extra in self._extra_train_labels().items():
            out[extra] = train_y[key]
        return out

    def _extra_train_labels(self) -> dict[str, str]:
        return {}


class Cifar10DataModule(_CifarDataModule):
    name = "cifar10"
    title = "CIFAR-10"
    num_classes = 10
    asymmetric_class_map = CIFAR10_ASYMMETRIC
    url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    md5 = "c58f30108f718f92721af3b95e74349a"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    default_root = "data/cifar10"


class Cifar100DataModule(_CifarDataModule):
    name = "cifar100"
    has_coarse_labels = True
    title = "CIFAR-100"
    num_classes = 100
    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"
    mean, std = CIFAR100_MEAN, CIFAR100_STD
    default_root = "data/cifar100"

    def _label_keys(self) -> tuple[str, ...]:
        return ("fine_labels", "coarse_labels")

    def _extra_train_labels(self) -> dict[str, str]:
        return {"coarse_labels": "train_coarse"}
