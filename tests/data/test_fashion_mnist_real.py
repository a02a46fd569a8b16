"""The real Fashion-MNIST, where Debian's package is installed (`.ci/run` installs it): the
files' content against REFERENCE.md's checksums, the shapes, 6,000 train / 1,000 test images
per class, and one short epoch of `kdlab train dataset=fashion_mnist` on a slice of it."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers.cli import cli

from kdlab.data.fashion_mnist import FashionMnistDataModule

SYSTEM = Path("/usr/share/datasets/fashion-mnist")
# decompressed content (sha256, bytes), as measured on Debian's copy (REFERENCE.md)
CONTENT = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", 47_040_016),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", 60_008),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", 7_840_016),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", 10_008),
}

pytestmark = [
    pytest.mark.real_parts,
    pytest.mark.skipif(not all((SYSTEM / name).is_file() for name in CONTENT),
                       reason=f"Fashion-MNIST's files are not in {SYSTEM} (Debian: apt-get "
                              "install dataset-fashion-mnist)"),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    dm = FashionMnistDataModule(root=str(tmp_path_factory.mktemp("empty")),
                                system_root=str(SYSTEM), download=False)
    dm.check()  # verifies every file before it is used
    return dm.load()


def test_the_installed_files_hold_the_official_content():
    for name, (sha256, size) in CONTENT.items():
        content = gzip.decompress((SYSTEM / name).read_bytes())
        assert (hashlib.sha256(content).hexdigest(), len(content)) == (sha256, size), name


def test_shapes_and_6000_train_1000_test_images_per_class(real):
    assert real["train_inputs"].shape == (60_000, 1, 28, 28)
    assert real["test_inputs"].shape == (10_000, 1, 28, 28)
    assert real["train_inputs"].dtype == torch.uint8
    assert torch.bincount(real["train_targets"]).tolist() == [6_000] * 10
    assert torch.bincount(real["test_targets"]).tolist() == [1_000] * 10
    # the files' first labels (ankle boot, T-shirt/top, ...; ankle boot, pullover, ...)
    assert real["train_targets"][:5].tolist() == [9, 0, 0, 3, 0]
    assert real["test_targets"][:5].tolist() == [9, 2, 1, 1, 6]


def test_one_short_epoch_on_a_slice(real, tmp_path, monkeypatch):
    """2,000 train / 1,000 test images through the real command: a label out of line with
    its image would leave the student at chance (10 %)."""
    def sliced(self):
        return {"train_inputs": real["train_inputs"][:2_000],
                "train_targets": real["train_targets"][:2_000],
                "test_inputs": real["test_inputs"][:1_000],
                "test_targets": real["test_targets"][:1_000]}

    monkeypatch.setattr(FashionMnistDataModule, "load", sliced)
    out = cli("train", "dataset=fashion_mnist", f"dataset.root={tmp_path / 'empty'}",
              f"dataset.system_root={SYSTEM}", "dataset.download=false",
              "dataset.batch_size=32", "method=ce", "student=mlp", "trainer=cpu",
              "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "num_threads=1",
              f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished"
    assert results["test"]["acc"] > 0.5
