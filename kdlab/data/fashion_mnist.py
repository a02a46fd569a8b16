"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747) from its four IDX files.

60,000 train + 10,000 test grayscale 28x28 images of 10 clothing classes (6,000 / 1,000 per
class). Each of the four official files (``FILES``) is taken from the first place that has
it: ``root`` (default ``$KDLAB_DATA_DIR/fashion_mnist``), then ``system_root`` (Debian's
``apt-get install dataset-fashion-mnist`` puts them in ``/usr/share/datasets/fashion-mnist``;
never written to), else it is downloaded from the official mirror into ``root`` (md5 of the
official .gz checked while it downloads). Debian recompressed its copy, so what is verified
for every source is the decompressed content: its IDX header and exact length, its size and
its sha256. A file that fails is one ``DatasetError`` line naming the file, the expected
checksum and the fix; nothing is read from a file that fails.

Images stay uint8 (N, 1, 28, 28) in memory (about 55 MB for the 70,000); normalisation and
the train augmentation (random crop of the image zero-padded by ``padding`` + horizontal
flip) run in batches on the device (``images.py``).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .download import DatasetError, _one_line, download_file
from .images import UInt8ImageDataModule
from .noise import FASHION_MNIST_ASYMMETRIC

URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")

# Per-channel mean and std of the 60,000 training images in [0, 1] (measured on the files).
MEAN, STD = (0.2860,), (0.3530,)


@dataclass(frozen=True)
class IdxFile:
    """What a file must hold: its decompressed content (sha256, bytes) and the md5 of the
    official .gz on the mirror (checked while downloading; Debian's recompressed .gz
    differs)."""

    sha256: str
    size: int
    md5: str


FILES = {
    "train-images-idx3-ubyte.gz": IdxFile(
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016,
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": IdxFile(
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008,
        "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": IdxFile(
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016,
        "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": IdxFile(
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008,
        "bb300cfdad3c16e7a12a480ee83cd310"),
}
SPLIT_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
IDX_UINT8 = 0x08


def read_idx(data: bytes) -> np.ndarray:
    """The array in IDX bytes: magic ``00 00 08 ndim`` (type 0x08 = uint8), one big-endian
    uint32 per dimension, then exactly prod(dims) bytes. ``ValueError`` says what is wrong."""
    if len(data) < 4:
        raise ValueError(f"only {len(data)} bytes, shorter than the IDX magic number")
    zeros, dtype, ndim = data[:2], data[2], data[3]
    if zeros != b"\0\0" or dtype != IDX_UINT8 or ndim == 0:
        raise ValueError(f"IDX magic number 0x{data[:4].hex()} is not 0x000008NN (uint8 data "
                         "with NN >= 1 dimensions)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{len(data)} bytes end inside the IDX header of {ndim} dimensions")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    if len(data) - header != expected:
        raise ValueError(f"the IDX header says {'x'.join(map(str, dims))} = {expected} bytes of "
                         f"data, the file has {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


class FashionMnistDataModule(UInt8ImageDataModule):
    name = "fashion_mnist"
    title = "Fashion-MNIST"
    num_classes = 10
    input_shape = (1, 28, 28)
    class_names = CLASS_NAMES
    asymmetric_class_map = FASHION_MNIST_ASYMMETRIC
    mean, std = MEAN, STD

    def __init__(self, root: str | None = None, system_root: str | None = SYSTEM_ROOT,
                 download: bool = True, url: str = URL, augment: bool = True, padding: int = 2,
                 **kwargs):
        super().__init__(augment=augment, padding=padding, **kwargs)
        self.root = Path(root or "data/fashion_mnist").expanduser()
        self.system_root = Path(system_root).expanduser() if system_root else None
        self.download = bool(download)
        self.url = str(url)
        self._verified: dict[str, np.ndarray] = {}  # read by check(), handed over to load()

    # -- where each file is ------------------------------------------------------------------
    def source(self, name: str) -> Path | None:
        """Where ``name`` is read from: ``root``, else ``system_root``; None if in neither."""
        for folder in (self.root, self.system_root):
            if folder is not None and (folder / name).is_file():
                return folder / name
        return None

    def _missing(self) -> list[str]:
        return [name for name in FILES if self.source(name) is None]

    def check(self) -> None:
        """Files missing with downloads off, or a file present with the wrong content: one
        line, before anything runs."""
        super().check()
        missing = self._missing()
        if missing and not self.download:
            places = f"{self.root}" + (f" or {self.system_root}" if self.system_root else "")
            raise DatasetError(
                f"{self.title} not found: {', '.join(missing)} in neither {places}; install "
                f"Debian's copy (apt-get install dataset-fashion-mnist), set "
                f"dataset.download=true to download the files from {self.url} into "
                f"{self.root}, or put the official files there")
        for name in FILES:
            if name not in missing and name not in self._verified:
                self._verified[name] = self._read(name)

    def prepare_data(self) -> None:
        """Download the files that are in neither place (Lightning calls this once per node
        first); each is verified when read."""
        missing = self._missing()
        if missing and not self.download:
            self.check()
        for name in missing:
            download_file(self.url + name, FILES[name].md5, self.root / name)

    # -- reading and verifying ---------------------------------------------------------------
    def _read(self, name: str) -> np.ndarray:
        path, spec = self.source(name), FILES[name]
        if path is None:  # gone since prepare_data() found or downloaded it
            raise DatasetError(f"{self.title} file {name} is missing from {self.root}; run again "
                               "with dataset.download=true")
        try:
            packed = path.read_bytes()
        except OSError as e:
            raise DatasetError(f"cannot read {path}: {_one_line(e)}; check its permissions") \
                from None
        try:
            data = gzip.decompress(packed)
        except (OSError, EOFError, zlib.error) as e:
            raise self._bad(path, name, f"its gzip data is truncated or damaged "
                            f"({_one_line(e)})") from None
        try:
            array = read_idx(data)
        except ValueError as e:
            raise self._bad(path, name, str(e)) from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != spec.size or digest != spec.sha256:
            raise self._bad(path, name, f"its content has sha256 {digest} ({len(data)} bytes)")
        return array

    def _bad(self, path: Path, name: str, problem: str) -> DatasetError:
        spec = FILES[name]
        if self.system_root is not None and path.parent == self.system_root:
            fix = ("reinstall Debian's copy (apt-get install --reinstall dataset-fashion-mnist) "
                   "or set dataset.system_root=null to download the files into dataset.root")
        else:
            fix = (f"delete it and run again: the file is then taken from Debian's copy "
                   f"(apt-get install dataset-fashion-mnist) or downloaded again from "
                   f"{self.url} (dataset.download=true)")
        return DatasetError(f"{path} is not the official {self.title} {name}: {problem}; "
                            f"expected decompressed content with sha256 {spec.sha256} "
                            f"({spec.size} bytes); {fix}")

    def _split(self, split: str) -> tuple[Tensor, Tensor]:
        images_file, labels_file = SPLIT_FILES[split]
        images = self._verified.pop(images_file, None)
        images = self._read(images_file) if images is None else images
        labels = self._verified.pop(labels_file, None)
        labels = self._read(labels_file) if labels is None else labels
        # files with the official checksums pass; this is for a FILES table of other files
        if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1] \
                or int(labels.max(initial=0)) >= self.num_classes:
            raise DatasetError(f"{self.title} {split} files hold images {images.shape} and labels "
                               f"{labels.shape} up to {int(labels.max(initial=0))}, not (N, 28, "
                               f"28) images with N labels in 0..{self.num_classes - 1}")
        return torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels).long()

    def load(self) -> dict[str, Tensor]:
        self.prepare_data()
        train_x, train_y = self._split("train")
        test_x, test_y = self._split("test")
        return {"train_inputs": train_x, "train_targets": train_y,
                "test_inputs": test_x, "test_targets": test_y}
