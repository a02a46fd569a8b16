"""Fashion-MNIST's four files made up: tiny IDX arrays, gzipped like the official ones, with
the checksums a test puts in place of the real ones (``checksums_of``), and damaged copies."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np

NAMES = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
         "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    """The IDX format written out: 0, 0, type, ndim, big-endian uint32 dims, raw data."""
    header = bytes([0, 0, type_byte, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_fashion_mnist(directory: Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
                       learnable: bool = False) -> tuple[dict, dict[str, np.ndarray]]:
    """Write the four .gz files into ``directory``; return (checksums, arrays).

    Labels are balanced over the 10 classes. ``learnable``: each image is its class's own
    pattern plus noise, so that a tiny run can learn something.
    """
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        if learnable:
            patterns = np.random.default_rng(99).integers(0, 256, (10, 28, 28))
            noise = rng.integers(-40, 41, (n, 28, 28))
            images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        else:
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = images, labels
    directory.mkdir(parents=True, exist_ok=True)
    checksums = {}
    for key, name in NAMES.items():
        checksums[name] = write_gz(directory / name, idx_bytes(arrays[key]))
    return checksums, arrays


def write_gz(path: Path, content: bytes) -> dict:
    """Gzip ``content`` to ``path``; its checksums as the datamodule's table holds them."""
    path.write_bytes(gzip.compress(content, mtime=0))
    return {"sha256": hashlib.sha256(content).hexdigest(), "size": len(content),
            "md5": hashlib.md5(path.read_bytes()).hexdigest()}


def use_checksums(monkeypatch, checksums: dict) -> None:
    """Make the datamodule expect the made-up files' checksums instead of the real ones."""
    from kdlab.data import fashion_mnist

    table = {name: fashion_mnist.IdxFile(**spec) for name, spec in checksums.items()}
    monkeypatch.setattr(fashion_mnist, "FILES", table)
