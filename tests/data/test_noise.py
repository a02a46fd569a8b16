"""Label noise: realised rates, determinism, clean held-out splits, the asymmetric maps and
the errors for bad settings."""

from __future__ import annotations

import pytest
import torch

from kdlab.data.base import SplitDataModule
from kdlab.data.digits import DigitsDataModule
from kdlab.data.noise import CIFAR10_ASYMMETRIC, apply_label_noise, superclass_ring
from kdlab.errors import ConfigError

N, C = 40_000, 10


def _labels(n=N, c=C, seed=0):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


# -- realised rates ------------------------------------------------------------------------

# (type, requested rate, expected share of labels that actually change)
RATES = [
    ("symmetric", 0.2, 0.2 * (1 - 1 / C)),  # the drawn label may equal the true one
    ("symmetric", 0.4, 0.4 * (1 - 1 / C)),
    ("symmetric_exclusive", 0.4, 0.4),
    ("pairflip", 0.3, 0.3),
    ("symmetric", 1.0, 1 - 1 / C),
]


@pytest.mark.parametrize("kind,rate,expected", RATES)
def test_realised_rate_is_close_to_the_request(kind, rate, expected):
    clean = _labels()
    noisy, mask = apply_label_noise(clean, kind, rate, num_classes=C, seed=3)
    assert torch.equal(mask, noisy != clean)
    assert float(mask.float().mean()) == pytest.approx(expected, abs=0.012)  # ~4.5 sigma
    assert noisy.min() >= 0 and noisy.max() < C


def test_symmetric_draws_uniformly_over_all_classes():
    clean = torch.zeros(N, dtype=torch.long)
    noisy, _ = apply_label_noise(clean, "symmetric", 1.0, num_classes=C, seed=0)
    share = torch.bincount(noisy, minlength=C).float() / N
    assert torch.allclose(share, torch.full((C,), 1 / C), atol=0.01)  # class 0 included


def test_pairflip_and_exclusive_never_keep_a_corrupted_label():
    clean = _labels()
    flipped, mask = apply_label_noise(clean, "pairflip", 0.5, num_classes=C, seed=1)
    assert torch.equal(flipped[mask], (clean[mask] + 1) % C)
    excl, mask = apply_label_noise(clean, "symmetric_exclusive", 1.0, num_classes=C, seed=1)
    assert mask.all()


def test_zero_rate_and_none_leave_labels_alone():
    clean = _labels(1000)
    for kind, rate in (("none", 0.0), ("symmetric", 0.0)):
        noisy, mask = apply_label_noise(clean, kind, rate, num_classes=C, seed=0)
        assert torch.equal(noisy, clean) and not mask.any()


def test_a_rate_without_a_noise_type_is_an_error_not_clean_labels():
    with pytest.raises(ConfigError, match="noise.rate=0.4 with noise=none.*noise=symmetric"):
        apply_label_noise(_labels(10), "none", 0.4, num_classes=C, seed=0)


# -- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["symmetric", "symmetric_exclusive", "pairflip"])
def test_noise_is_a_function_of_the_seed(kind):
    clean = _labels(5000)
    a, mask_a = apply_label_noise(clean, kind, 0.4, num_classes=C, seed=7)
    b, mask_b = apply_label_noise(clean, kind, 0.4, num_classes=C, seed=7)
    c, _ = apply_label_noise(clean, kind, 0.4, num_classes=C, seed=8)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(a, c)


def test_datamodule_noise_is_deterministic_from_the_seed():
    def noisy_targets(seed):
        dm = DigitsDataModule(noise={"type": "symmetric", "rate": 0.4}, seed=seed)
        dm.setup()
        return dm.splits["train"].targets, dm.noise_mask

    a, mask_a = noisy_targets(1)
    b, mask_b = noisy_targets(1)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, noisy_targets(2)[1])


# -- only the train split is corrupted -----------------------------------------------------


def test_meta_val_test_splits_stay_clean():
    noise = {"type": "symmetric", "rate": 0.6}
    noisy = DigitsDataModule(noise=noise, seed=4, val_fraction=0.1)
    clean = DigitsDataModule(noise={"type": "none", "rate": 0.0}, seed=4, val_fraction=0.1)
    noisy.setup()
    clean.setup()
    for split in ("meta", "val", "test"):
        assert torch.equal(noisy.splits[split].inputs, clean.splits[split].inputs), split
        assert torch.equal(noisy.splits[split].targets, clean.splits[split].targets), split
    train, ref = noisy.splits["train"], clean.splits["train"]
    assert torch.equal(train.inputs, ref.inputs)
    assert torch.equal(train.clean_targets, ref.targets)  # the true labels are kept
    assert torch.equal(noisy.noise_mask, train.targets != ref.targets)
    assert noisy.noise_mask.shape == (noisy.train_size,)
    # the realised rate the run reports is the mask's share
    described = noisy.describe()["noise"]
    assert described == {"type": "symmetric", "rate": 0.6,
                         "realised_rate": pytest.approx(float(noisy.noise_mask.float().mean()))}
    assert described["realised_rate"] == pytest.approx(0.6 * 0.9, abs=0.06)  # ~1300 examples
    assert clean.describe()["noise"]["realised_rate"] == 0.0


def test_meta_and_test_targets_are_the_original_labels():
    from sklearn.datasets import load_digits

    dm = DigitsDataModule(noise={"type": "symmetric", "rate": 1.0}, seed=0)
    dm.setup()
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).reshape(len(digits.target), -1)
    truth = {tuple(img.tolist()): int(y) for img, y in zip(images, digits.target, strict=True)}
    for split in ("meta", "test"):
        ds = dm.splits[split]
        for x, y in zip(ds.inputs.reshape(len(ds), -1), ds.targets, strict=True):
            assert truth[tuple(x.tolist())] == int(y)
    assert dm.noise_mask.float().mean() > 0.8  # while the train split is almost all noise


# -- asymmetric maps -----------------------------------------------------------------------


def test_cifar10_asymmetric_map():
    assert CIFAR10_ASYMMETRIC == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}  # truck->automobile, ...
    clean = _labels()
    noisy, mask = apply_label_noise(clean, "asymmetric", 1.0, num_classes=10, seed=0,
                                    class_map=CIFAR10_ASYMMETRIC)
    expected = clean.clone()
    for src, dst in CIFAR10_ASYMMETRIC.items():
        expected[clean == src] = dst
    assert torch.equal(noisy, expected)
    # with probability r: the share among mappable classes, no other class touched
    noisy, mask = apply_label_noise(clean, "asymmetric", 0.3, num_classes=10, seed=0,
                                    class_map=CIFAR10_ASYMMETRIC)
    mappable = torch.isin(clean, torch.tensor(list(CIFAR10_ASYMMETRIC)))
    assert not mask[~mappable].any()
    assert float(mask[mappable].float().mean()) == pytest.approx(0.3, abs=0.015)
    changed = mask.nonzero().flatten()
    assert all(CIFAR10_ASYMMETRIC[int(clean[i])] == int(noisy[i]) for i in changed[:500])


def test_cifar10_datamodule_carries_the_map():
    from kdlab.data.cifar import Cifar10DataModule

    assert Cifar10DataModule.asymmetric_class_map == CIFAR10_ASYMMETRIC


def _coarse_assignment(n_fine=100, n_coarse=20, seed=0):
    """A synthetic fine -> coarse assignment, shuffled so superclasses are not contiguous."""
    perm = torch.randperm(n_fine, generator=torch.Generator().manual_seed(seed))
    coarse_of = torch.empty(n_fine, dtype=torch.long)
    coarse_of[perm] = torch.arange(n_fine) % n_coarse
    return coarse_of


def test_cifar100_superclass_ring():
    coarse_of = _coarse_assignment()
    fine = _labels(20_000, 100, seed=1)
    coarse = coarse_of[fine]
    ring = superclass_ring(fine, coarse)
    assert sorted(ring) == list(range(100))
    for members in (torch.nonzero(coarse_of == c).flatten().tolist() for c in range(20)):
        assert len(members) == 5
        ordered = sorted(members)
        # next fine class of the same superclass, circular: one 5-cycle per superclass
        assert [ring[f] for f in ordered] == ordered[1:] + ordered[:1]
    noisy, mask = apply_label_noise(fine, "asymmetric", 0.4, num_classes=100, seed=2,
                                    coarse=coarse)
    assert torch.equal(coarse_of[noisy], coarse)  # never leaves the superclass
    assert torch.equal(noisy[mask], torch.tensor([ring[int(f)] for f in fine[mask]]))
    assert float(mask.float().mean()) == pytest.approx(0.4, abs=0.02)


class _CoarseData(SplitDataModule):
    """A datamodule whose load() returns coarse labels, like CIFAR-100's."""

    name = "coarse_toy"
    num_classes = 100
    input_shape = (2,)

    def load(self):
        coarse_of = _coarse_assignment(seed=5)
        y = torch.arange(4000) % 100
        x = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
        return {"train_inputs": x, "train_targets": y, "train_coarse": coarse_of[y],
                "test_inputs": x[:100], "test_targets": y[:100]}


def test_datamodule_uses_coarse_labels_for_asymmetric_noise():
    dm = _CoarseData(noise={"type": "asymmetric", "rate": 0.5}, seed=0)
    dm.setup()
    coarse_of = _coarse_assignment(seed=5)
    train = dm.splits["train"]
    assert torch.equal(coarse_of[train.targets], coarse_of[train.clean_targets])
    assert 0.4 < dm.realised_noise_rate < 0.6
    data = dm.load()
    truth = {tuple(x.tolist()): int(y) for x, y in zip(data["train_inputs"],
                                                        data["train_targets"], strict=True)}
    meta = dm.splits["meta"]
    assert all(truth[tuple(x.tolist())] == int(y)
               for x, y in zip(meta.inputs, meta.targets, strict=True))


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("noise,match", [
    ({"type": "gaussian", "rate": 0.2}, "unknown noise type"),
    ({"type": "symmetric", "rate": 1.5}, r"\[0, 1\]"),
    ({"type": "pairflip", "rate": -0.1}, r"\[0, 1\]"),
    ({"type": "asymmetric", "rate": 0.2}, "class map"),  # digits has no built-in map
])
def test_bad_noise_settings_raise_config_error(noise, match):
    with pytest.raises(ConfigError, match=match):
        apply_label_noise(_labels(100), num_classes=C, **noise)
    with pytest.raises(ConfigError, match=match):  # at construction when it can tell
        DigitsDataModule(noise=noise, seed=0).setup()


def test_asymmetric_with_a_given_class_map_works_anywhere():
    dm = DigitsDataModule(noise={"type": "asymmetric", "rate": 1.0, "class_map": {1: 7}}, seed=0)
    dm.setup()
    train = dm.splits["train"]
    assert torch.equal(train.targets[train.clean_targets == 1],
                       torch.full_like(train.targets[train.clean_targets == 1], 7))
    assert torch.equal(dm.noise_mask, train.clean_targets == 1)
