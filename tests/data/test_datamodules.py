"""Splits, batches and sharding of the in-memory datamodules."""

import numpy as np
import pytest
import torch

from kdlab.data import base as data_base
from kdlab.data.base import BatchSampler
from kdlab.data.digits import DigitsDataModule
from kdlab.data.synthetic import SyntheticDataModule
from kdlab.errors import ConfigError


def _rows(x):
    return {tuple(r.flatten().tolist()) for r in x}


def test_digits_splits_are_disjoint_stratified_and_clean():
    dm = DigitsDataModule(seed=0, meta_fraction=0.1, val_fraction=0.0)
    dm.setup()
    tr, meta, val, te = (dm.splits[k] for k in ("train", "meta", "val", "test"))
    assert len(tr) + len(meta) + len(te) == 1797
    assert len(te) == round(0.2 * 1797) or abs(len(te) - 0.2 * 1797) < 1
    assert abs(len(meta) - 0.1 * (len(tr) + len(meta))) <= 1
    assert val is meta  # val_fraction = 0 -> validate on the clean meta split
    assert not (_rows(tr.inputs) & _rows(meta.inputs))
    assert not (_rows(tr.inputs) & _rows(te.inputs))
    counts = np.bincount(meta.targets.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 2  # stratified: 14-15 per class
    assert torch.equal(tr.targets, tr.clean_targets)  # noise=none
    assert dm.realised_noise_rate == 0.0


def test_split_follows_the_seed_but_test_set_is_fixed():
    a, b, c = (DigitsDataModule(seed=s) for s in (0, 0, 1))
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.splits["meta"].inputs, b.splits["meta"].inputs)
    assert not torch.equal(a.splits["meta"].inputs, c.splits["meta"].inputs)
    assert torch.equal(a.splits["test"].inputs, c.splits["test"].inputs)


def test_separate_val_split():
    dm = DigitsDataModule(seed=0, meta_fraction=0.1, val_fraction=0.1)
    dm.setup()
    assert dm.splits["val"] is not dm.splits["meta"]
    assert not (_rows(dm.splits["val"].inputs) & _rows(dm.splits["meta"].inputs))
    assert not (_rows(dm.splits["val"].inputs) & _rows(dm.splits["train"].inputs))


def test_batches_are_dicts_with_positions():
    dm = DigitsDataModule(seed=0, batch_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input", "target", "index"}
    assert batch["input"].shape == (32, 1, 8, 8)
    train = dm.splits["train"]
    assert torch.equal(train.inputs[batch["index"]], batch["input"])
    assert torch.equal(train.targets[batch["index"]], batch["target"])
    # an epoch visits every train example at most once, dropping only the last partial batch
    seen = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert len(seen) == len(seen.unique()) == len(train) // 32 * 32


def test_sampler_epoch_order_and_rank_sharding(monkeypatch):
    s = BatchSampler(100, 10, shuffle=True, seed=3, drop_last=True)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(data_base, "_distributed_rank_world", lambda r=rank: (r, 2))
        shards.append([i for b in s for i in b])
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(100))
    monkeypatch.setattr(data_base, "_distributed_rank_world", lambda: (2, 3))
    s3 = BatchSampler(100, 10, shuffle=True, seed=3, drop_last=True)
    assert [len(b) for b in s3] == [10, 10, 10]  # 33 examples per rank, the partial batch dropped
    # evaluation keeps every example: ranks differ by at most one
    ev = [BatchSampler(101, 64, shuffle=False, seed=0, drop_last=False) for _ in range(2)]
    sizes = []
    for rank, sampler in enumerate(ev):
        monkeypatch.setattr(data_base, "_distributed_rank_world", lambda r=rank: (r, 2))
        sizes.append(sum(len(b) for b in sampler))
    assert sizes == [51, 50]


def test_synthetic_shapes_and_standardisation():
    dm = SyntheticDataModule(n_samples=1000, seed=0)
    dm.setup()
    assert dm.num_classes == 20 and dm.input_shape == (14,)
    x = torch.cat([dm.splits[s].inputs for s in ("train", "meta", "val")])
    assert torch.allclose(x.mean(0), torch.zeros(14), atol=1e-4)


@pytest.mark.parametrize("kw", [{"meta_fraction": 0.0}, {"meta_fraction": 1.0},
                                {"val_fraction": -0.1}])
def test_bad_fractions(kw):
    with pytest.raises(ConfigError):
        DigitsDataModule(**kw)


def test_train_on_meta_adds_the_clean_meta_examples_to_training():
    noise = {"type": "symmetric", "rate": 0.4}
    base = DigitsDataModule(noise=noise, seed=1, val_fraction=0.1)
    both = DigitsDataModule(noise=noise, seed=1, val_fraction=0.1, train_on_meta=True)
    base.setup()
    both.setup()
    train, meta = base.splits["train"], base.splits["meta"]
    n = len(train)
    assert len(both.splits["train"]) == n + len(meta)
    assert torch.equal(both.splits["train"].inputs, torch.cat([train.inputs, meta.inputs]))
    # the noisy labels of the original part are the same draw; the meta part keeps its labels
    assert torch.equal(both.splits["train"].targets, torch.cat([train.targets, meta.targets]))
    assert torch.equal(both.noise_mask, torch.cat([base.noise_mask,
                                                   torch.zeros(len(meta), dtype=torch.bool)]))
    assert torch.equal(both.splits["val"].inputs, base.splits["val"].inputs)
    with pytest.raises(ConfigError, match="needs a separate validation split"):
        DigitsDataModule(train_on_meta=True, val_fraction=0.0)


def test_synthetic_is_the_authors_generator():
    from sklearn.datasets import make_classification

    dm = SyntheticDataModule(seed=0)
    x, y = make_classification(n_samples=10_000, n_features=14, n_informative=14,
                               n_redundant=0, n_classes=20, n_clusters_per_class=1,
                               flip_y=0.0, random_state=0)
    dm.setup()
    assert dm.gen["n_informative"] == 14 and dm.gen["flip_y"] == 0.0
    sizes = dm.describe()["sizes"]
    assert sizes["train"] + sizes["meta"] + sizes["val"] + sizes["test"] == len(y)
    splits = ("train", "meta", "val", "test")
    assert sorted(torch.cat([dm.splits[s].targets for s in splits]).tolist()) \
        == sorted(y.tolist())
