"""dataset=imagefolder (kdlab/data/imagefolder.py over kdlab/data/encoded.py): a class-per-
folder tree read as it is. Ids, splits and label noise by id, the batch contract, sharding
over ranks, where images are decoded, and the bad trees refused before training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.images import write_tree
from torchvision.io import decode_jpeg

import kdlab.data.base
from kdlab.data.download import DatasetError
from kdlab.data.imagefolder import ImageFolderDataModule

SMALL = {"crop_size": 12, "resize_size": 16, "num_workers": 0}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("tree")
    return root, write_tree(root, classes=4, per_class=40, size=16)


def folder_labels(files: list[str]) -> torch.Tensor:
    return torch.tensor([int(f.split("/")[0].removeprefix("class")) for f in files])


def datamodule(root, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(path=str(root), **{**SMALL, **kwargs})
    dm.check()
    dm.setup()
    return dm


def test_ids_are_sorted_files_and_the_splits_partition_them_by_id(tree):
    root, files = tree
    dm = datamodule(root, seed=0)
    ids = {name: set(s.ids.tolist()) for name, s in dm.splits.items()}
    assert set().union(*ids.values()) == set(range(160))
    assert sum(len(v) for v in ids.values()) == 160  # disjoint
    # 10 % test (16, 4 per class), then of the 144 left 10 % meta and 10 % val (ceil)
    assert [len(dm.splits[s]) for s in ("test", "meta", "val", "train")] == [16, 15, 15, 114]
    labels = folder_labels(files)
    assert torch.bincount(labels[dm.splits["test"].ids]).tolist() == [4, 4, 4, 4]
    for split in dm.splits.values():
        assert torch.equal(split.clean_targets, labels[split.ids])
    assert dm.num_classes == 4 and dm.input_shape == (3, 12, 12)


def test_the_test_split_is_fixed_and_meta_val_follow_the_seed(tree):
    root, _ = tree
    a, b = datamodule(root, seed=0), datamodule(root, seed=1)
    assert torch.equal(a.splits["test"].ids, b.splits["test"].ids)
    assert not torch.equal(a.splits["meta"].ids, b.splits["meta"].ids)
    other = datamodule(root, seed=0, split_seed=5)
    assert not torch.equal(a.splits["test"].ids, other.splits["test"].ids)


def test_label_noise_touches_only_train_labels_and_never_the_files(tree):
    root, files = tree
    clean = datamodule(root, seed=3)
    noisy = datamodule(root, seed=3, noise={"type": "symmetric_exclusive", "rate": 0.5})
    labels = folder_labels(files)
    train = noisy.splits["train"]
    assert torch.equal(train.ids, clean.splits["train"].ids)
    assert torch.equal(train.clean_targets, labels[train.ids])
    changed = train.targets != labels[train.ids]
    assert torch.equal(changed, noisy.noise_mask)
    assert 0.3 < float(changed.float().mean()) < 0.7  # 114 draws at rate 0.5
    for split in ("meta", "val", "test"):
        assert torch.equal(noisy.splits[split].targets, labels[noisy.splits[split].ids])
    # a training batch carries the noisy label of its row
    batch = noisy.model_batch(next(iter(noisy.train_dataloader())), "cpu", train=True)
    assert torch.equal(batch["target"], train.targets[batch["index"]])


def test_a_batch_holds_input_target_index_and_id(tree):
    root, files = tree
    dm = datamodule(root, seed=0, batch_size=16)
    raw = next(iter(dm.train_dataloader()))
    assert raw["input"].dtype == torch.uint8 and raw["input"].shape == (16, 3, 12, 12)
    batch = dm.model_batch(raw, "cpu", train=True)
    assert sorted(batch) == ["id", "index", "input", "target"]
    assert batch["input"].dtype == torch.float32
    train = dm.splits["train"]
    assert torch.equal(train.ids[batch["index"]], batch["id"])  # index: the row, id: global
    assert torch.equal(batch["target"], folder_labels(files)[batch["id"]])


def test_examples_are_the_centre_crops_of_the_files(tree):
    root, files = tree
    dm = datamodule(root, crop_size=12, resize_size=16)  # 16 x 16 files: no resize
    rows = torch.tensor([0, 5])
    got = dm.examples("meta", rows, "cpu")
    ids = dm.splits["meta"].ids[rows]
    for k, i in enumerate(ids.tolist()):
        data = torch.frombuffer(bytearray((root / files[i]).read_bytes()), dtype=torch.uint8)
        crop = decode_jpeg(data)[:, 2:14, 2:14]
        expected = (crop.float() / 255 - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(
            dm.std).view(3, 1, 1)
        assert torch.allclose(got["input"][k], expected, atol=1e-6)
    assert torch.equal(got["index"], rows) and torch.equal(got["id"], ids)


def test_an_epoch_is_the_same_in_a_fresh_datamodule(tree):
    """What an exact resume needs: epoch e's batches depend on (seed, e) only."""
    root, _ = tree
    first, again = datamodule(root, seed=2), datamodule(root, seed=2)
    loader = first.train_dataloader()
    epochs = []
    for e in range(3):
        loader.sampler.set_epoch(e)
        epochs.append(list(loader))
    resumed = again.train_dataloader()
    resumed.sampler.set_epoch(2)
    for a, b in zip(epochs[2], resumed, strict=True):
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["input"], b["input"])
    assert not torch.equal(epochs[0][0]["id"], epochs[1][0]["id"])
    # the same example gets another crop in another epoch
    same = {}
    for batches in epochs[:2]:
        for b in batches:
            for i, x in zip(b["id"].tolist(), b["input"], strict=True):
                same.setdefault(i, []).append(x)
    assert any(not torch.equal(*views) for views in same.values() if len(views) == 2)


def test_decoding_on_the_device_gives_the_workers_batches(tree):
    root, _ = tree
    workers = datamodule(root, seed=1, decode="workers", batch_size=8)
    device = datamodule(root, seed=1, decode="device", batch_size=8)
    raw = next(iter(device.train_dataloader()))
    assert "encoded" in raw and "input" not in raw  # bytes leave the loader
    a = workers.model_batch(next(iter(workers.train_dataloader())), "cpu", train=True)
    b = device.model_batch(raw, "cpu", train=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ranks_read_disjoint_rows_that_together_cover_the_split(tree, monkeypatch):
    root, _ = tree
    dm = datamodule(root, seed=0, batch_size=19)  # 114 train rows = 2 ranks x 3 x 19
    seen = []
    for rank in (0, 1):
        monkeypatch.setattr(kdlab.data.base, "_distributed_rank_world", lambda r=rank: (r, 2))
        seen.append(torch.cat([b["index"] for b in dm.train_dataloader()]).tolist())
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(114))


# -- bad trees -------------------------------------------------------------------------------


def test_an_empty_tree_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="no class folders"):
        ImageFolderDataModule(path=str(tmp_path)).check()
    with pytest.raises(DatasetError, match="not a directory"):
        ImageFolderDataModule(path=str(tmp_path / "missing")).check()


def test_a_class_folder_without_images_is_refused(tmp_path):
    write_tree(tmp_path, classes=2, per_class=2)
    (tmp_path / "zebra").mkdir()
    (tmp_path / "zebra" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"1 class folder\(s\) hold no images \(zebra\)"):
        ImageFolderDataModule(path=str(tmp_path)).check()


def test_a_file_that_is_no_image_is_refused_before_training(tmp_path):
    write_tree(tmp_path, classes=2, per_class=3)
    (tmp_path / "class1" / "broken.JPEG").write_bytes(b"this is not a JPEG")
    with pytest.raises(DatasetError, match=r"1 file\(s\) .* not readable images: "
                                           r"class1/broken.JPEG"):
        ImageFolderDataModule(path=str(tmp_path)).check()


def test_a_test_tree_with_other_classes_is_refused(tmp_path):
    write_tree(tmp_path / "train", classes=3, per_class=2)
    write_tree(tmp_path / "val", classes=2, per_class=2)
    dm = ImageFolderDataModule(path=str(tmp_path / "train"), test_path=str(tmp_path / "val"))
    with pytest.raises(DatasetError, match="other classes"):
        dm.check()
