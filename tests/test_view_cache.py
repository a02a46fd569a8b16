"""teacher_cache=views: the teachers' logits for every (example, crop + flip view), looked up
per step. Exact against a teacher forward on the same augmented batch, the same training
trajectory as without it, resumable when interrupted."""

from __future__ import annotations

import tarfile
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from helpers.cifar import make_cifar10
from helpers.fashion_mnist import make_fashion_mnist, use_checksums

from kdlab.config import compose
from kdlab.data.augment import CIFAR10_MEAN, CIFAR10_STD, crop_flip_views
from kdlab.data.cifar import Cifar10DataModule
from kdlab.data.fashion_mnist import FashionMnistDataModule
from kdlab.models import build_model
from kdlab.models.loading import freeze
from kdlab.pipeline import run
from kdlab.teachers import Teachers, ViewCache


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar10")
    make_cifar10(root, per_batch=6, n_test=10)
    with tarfile.open(root / "cifar-10-python.tar.gz") as tar:
        tar.extractall(root, filter="data")
    return root


def datamodule(root):
    dm = Cifar10DataModule(root=str(root), download=False, batch_size=16, seed=0)
    dm.setup()
    return dm


def by_hand(images: torch.Tensor, top: int, left: int, flip: bool) -> torch.Tensor:
    """The crop + flip of uint8 images written out with slicing, then normalised."""
    padded = F.pad(images.float(), (4, 4, 4, 4))
    out = padded[:, :, top:top + 32, left:left + 32]
    if flip:
        out = out.flip(-1)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (out / 255 - mean) / std


def build(dm, teacher, tmp_path):
    teachers = Teachers([teacher], cache_mode="views", cache_dir=tmp_path)
    teachers.build_view_cache(dm, key=lambda: b"test", device="cpu", precision=nullcontext,
                              dtype=torch.float32, show_progress=False)
    return teachers


def test_every_view_of_a_few_images_matches_a_teacher_forward(cifar_root, tmp_path):
    dm = datamodule(cifar_root)
    torch.manual_seed(0)
    teacher = freeze(build_model("cnn", 10, (3, 32, 32), width=4))
    teachers = build(dm, teacher, tmp_path)
    assert teachers.views.table.shape == (1, dm.train_size, 162, 10) == (
        1, dm.train_size, crop_flip_views(4), 10)
    images = dm.splits["train"].inputs[:3]
    index = torch.arange(3)
    # the views the training path reports: every (offset, flip) by preprocess's own draws
    seen = set()
    for _ in range(30):
        batch = dm.preprocess({"input": images, "target": torch.zeros(3), "index": index},
                              train=True)
        looked_up = teachers.for_training_batch(batch)[0].logits
        with torch.no_grad():
            fresh = teacher(batch["input"])
        torch.testing.assert_close(looked_up, fresh, atol=1e-5, rtol=1e-5)
        seen |= set(batch["view"].tolist())
    assert len(seen) > 50
    # and every view, against a crop written out by hand
    for v in range(162):
        cell, flip = divmod(v, 2)
        top, left = divmod(cell, 9)
        with torch.no_grad():
            fresh = teacher(by_hand(images, top, left, bool(flip)))
        table = teachers.views.lookup(index, torch.full_like(index, v))[0].logits
        torch.testing.assert_close(table, fresh, atol=1e-5, rtol=1e-5)


def test_every_fashion_mnist_view_matches_a_teacher_forward(tmp_path, monkeypatch):
    """One channel, 28 x 28, padding 2: 5 x 5 offsets x 2 flips = 50 views."""
    checksums, _ = make_fashion_mnist(tmp_path / "data", n_train=40, n_test=10)
    use_checksums(monkeypatch, checksums)
    dm = FashionMnistDataModule(root=str(tmp_path / "data"), system_root=None, download=False,
                                batch_size=16)
    dm.setup()
    torch.manual_seed(0)
    teacher = freeze(build_model("cnn", 10, (1, 28, 28), width=4))
    teachers = build(dm, teacher, tmp_path)
    assert teachers.views.table.shape == (1, dm.train_size, 50, 10)
    images, index = dm.splits["train"].inputs[:3], torch.arange(3)
    for v in range(50):
        cell, flip = divmod(v, 2)
        top, left = divmod(cell, 5)
        crop = F.pad(images.float(), (2, 2, 2, 2))[:, :, top:top + 28, left:left + 28]
        crop = crop.flip(-1) if flip else crop
        with torch.no_grad():
            fresh = teacher((crop / 255 - 0.2860) / 0.3530)
        table = teachers.views.lookup(index, torch.full_like(index, v))[0].logits
        torch.testing.assert_close(table, fresh, atol=1e-5, rtol=1e-5)
    # and the views the training path draws are looked up as the teacher sees them
    for _ in range(10):
        batch = dm.preprocess({"input": images, "target": torch.zeros(3), "index": index},
                              train=True)
        looked_up = teachers.for_training_batch(batch)[0].logits
        with torch.no_grad():
            torch.testing.assert_close(looked_up, teacher(batch["input"]), atol=1e-5,
                                       rtol=1e-5)


def test_an_interrupted_build_continues_where_it_stopped(tmp_path):
    expected = torch.randn(1, 20, 162, 10, generator=torch.Generator().manual_seed(0))
    cache = ViewCache(tmp_path / "t.bin", (1, 20, 162, 10), torch.float32)
    filled = []

    def fill(v, table, stop_at=None):
        if v == stop_at:
            raise KeyboardInterrupt
        filled.append(v)
        table[0, :, v] = expected[0, :, v]

    with pytest.raises(KeyboardInterrupt):
        cache.build(lambda v, table: fill(v, table, stop_at=40), show_progress=False)
    assert filled == list(range(40))
    filled.clear()
    reopened = ViewCache(tmp_path / "t.bin", (1, 20, 162, 10), torch.float32)
    assert reopened.build(fill, show_progress=False) is False  # it was not complete
    assert filled == list(range(40, 162))
    assert torch.equal(reopened.table, expected)
    assert reopened.build(fill, show_progress=False) is True  # now it is: nothing recomputed
    assert filled == list(range(40, 162))
    # another shape (other data or teachers) is another table: started from scratch
    other = ViewCache(tmp_path / "t.bin", (1, 21, 162, 10), torch.float32)
    filled.clear()
    other.build(lambda v, table: filled.append(v), show_progress=False)
    assert filled == list(range(162))


def test_a_resumed_build_shows_its_progress_in_views_from_where_it_stopped(tmp_path, capsys):
    def stop_at_40(v, table):
        if v == 40:
            raise KeyboardInterrupt

    cache = ViewCache(tmp_path / "t.bin", (1, 2, 162, 3), torch.float32)
    with pytest.raises(KeyboardInterrupt):
        cache.build(stop_at_40, show_progress=False)
    ViewCache(tmp_path / "t.bin", (1, 2, 162, 3), torch.float32).build(
        lambda v, table: None, show_progress=True)
    err = capsys.readouterr().err
    steps = [s for s in err.rstrip("\n").split("\r") if s]
    assert err.endswith("\n") and err.count("\n") == 1
    assert " 40/162 [" in steps[0]  # the first line drawn: the 40 views done before
    assert steps[-1].startswith("teacher logits (every augmented view, once): 100%")
    assert " 162/162 [" in steps[-1] and "view/s" in steps[-1]


def test_auto_uses_the_view_cache_when_more_epochs_read_it_than_it_costs():
    teachers = Teachers([torch.nn.Linear(2, 2)])
    assert not teachers.use_views(100, 162, False, False)
    assert teachers.use_views(240, 162, False, False)
    teachers.cache_runs = 2  # a sweep of two runs reads it 200 times
    assert teachers.use_views(100, 162, False, False)
    assert not teachers.use_views(240, 162, needs_features=True, transforms_batch=False)
    assert not teachers.use_views(240, 162, needs_features=False, transforms_batch=True)
    assert not teachers.use_views(240, 0, False, False)  # no enumerable augmentation


def test_a_run_with_the_view_cache_follows_the_same_trajectory(cifar_root, tmp_path,
                                                               monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    args = ["dataset=cifar10", f"dataset.root={cifar_root}", "dataset.download=false",
            "dataset.batch_size=8", "student=cnn_small", "teacher=cnn", "teacher.width=4",
            "trainer=cpu",
            "trainer.max_epochs=2", "teacher.max_epochs=1", "trainer.enable_progress_bar=false",
            "num_threads=1", "seed=3"]
    with_views = run(compose([*args, "teacher_cache=views"]), tmp_path / "views")
    without = run(compose([*args, "teacher_cache=off"]), tmp_path / "off")
    assert with_views["throughput"]["teacher_cache_s"] > 0
    for split in ("test", "test_last", "val"):
        for metric, value in without[split].items():
            assert with_views[split][metric] == pytest.approx(value, abs=1e-5), (split, metric)
    assert with_views["teachers"][0]["test"] == without["teachers"][0]["test"]
