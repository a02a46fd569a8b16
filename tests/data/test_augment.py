"""Batched crop+flip against a per-example reference, its draw distribution, normalize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kdlab.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    crop_flip,
    normalize,
    random_crop_flip,
    sample_crop_flip,
)


def naive_crop_flip(x, offsets, flips, padding):
    """Per-example reference: zero-pad, slice the window, flip."""
    h, w = x.shape[-2:]
    out = []
    for img, (top, left), flip in zip(x, offsets.tolist(), flips.tolist(), strict=True):
        padded = F.pad(img, (padding,) * 4)
        crop = padded[:, top:top + h, left:left + w]
        out.append(crop.flip(-1) if flip else crop)
    return torch.stack(out)


def _random_images(n, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("padding", [0, 1, 4])
def test_crop_flip_matches_naive_reference(padding):
    span = 2 * padding
    corners = [(t, left) for t in (0, span) for left in (0, span)]
    fixed = torch.tensor(corners * 2)
    fixed_flips = torch.tensor([False] * 4 + [True] * 4)
    g = torch.Generator().manual_seed(1)
    rand_off = torch.randint(0, span + 1, (56, 2), generator=g)
    rand_flip = torch.randint(0, 2, (56,), generator=g).bool()
    offsets, flips = torch.cat([fixed, rand_off]), torch.cat([fixed_flips, rand_flip])
    x = _random_images(len(offsets))
    out = crop_flip(x, offsets, flips, padding)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(out, naive_crop_flip(x, offsets, flips, padding))


def test_crop_flip_non_square_and_centre_is_identity():
    x = _random_images(5, c=2, h=6, w=9)
    centre = torch.full((5, 2), 4)
    assert torch.equal(crop_flip(x, centre, torch.zeros(5, dtype=torch.bool), 4), x)
    assert torch.equal(crop_flip(x, centre, torch.ones(5, dtype=torch.bool), 4), x.flip(-1))
    offsets, flips = sample_crop_flip(5, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(crop_flip(x, offsets, flips, 4), naive_crop_flip(x, offsets, flips, 4))


def test_random_crop_flip_returns_the_draws_it_used():
    x = _random_images(32)
    out, offsets, flips = random_crop_flip(x, 4, generator=torch.Generator().manual_seed(0),
                                           return_params=True)
    assert offsets.shape == (32, 2) and flips.shape == (32,) and flips.dtype == torch.bool
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 8
    assert torch.equal(out, naive_crop_flip(x, offsets, flips, 4))


def test_reproducible_with_generator_and_with_global_seed():
    x = _random_images(64)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(123))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(123))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = random_crop_flip(x)
    torch.manual_seed(7)
    e = random_crop_flip(x)
    assert torch.equal(d, e)


def _candidates(img, padding):
    """All (2p+1)^2 * 2 possible outputs for one image, and their (top, left, flip)."""
    span = 2 * padding + 1
    params = [(t, left, f) for f in (0, 1) for t in range(span) for left in range(span)]
    offsets = torch.tensor([(t, left) for t, left, _ in params])
    flips = torch.tensor([bool(f) for *_, f in params])
    n = len(params)
    outs = naive_crop_flip(img.expand(n, *img.shape), offsets, flips, padding)
    return outs.flatten(1).long(), params


def _cell_of(outputs, candidates):
    """Index of the candidate each output equals (exact), via an integer fingerprint."""
    weights = torch.randint(0, 1 << 20, (candidates.shape[1],),
                            generator=torch.Generator().manual_seed(0))
    cand_keys = candidates @ weights
    assert len(torch.unique(cand_keys)) == len(cand_keys)
    order = torch.argsort(cand_keys)
    keys = outputs.flatten(1).long() @ weights
    pos = torch.searchsorted(cand_keys[order], keys).clamp(max=len(order) - 1)
    cell = order[pos]
    assert torch.equal(candidates[cell], outputs.flatten(1).long()), "output not a valid crop"
    return cell


def test_draw_distribution_is_uniform_and_matches_torchvision():
    """20000 crops of an 8x8 image with unique non-zero pixels: each output identifies its
    (top, left, flip) cell exactly; the 162 cells are uniform, flips ~ 1/2, and the cells of
    torchvision's per-sample RandomCrop(8, padding=4) + RandomHorizontalFlip (which must be
    the same set of outputs) follow the same distribution."""
    stats = pytest.importorskip("scipy.stats")
    padding, n = 4, 20_000
    img = torch.arange(1, 65, dtype=torch.uint8).view(1, 8, 8)
    candidates, params = _candidates(img, padding)
    out, offsets, flips = random_crop_flip(img.expand(n, 1, 8, 8), padding,
                                           generator=torch.Generator().manual_seed(2024),
                                           return_params=True)
    cell = _cell_of(out, candidates)
    recovered = torch.tensor(params)[cell]
    assert torch.equal(recovered[:, :2], offsets)
    assert torch.equal(recovered[:, 2].bool(), flips)

    counts = torch.bincount(cell, minlength=len(params)).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    assert abs(flips.float().mean().item() - 0.5) < 0.015
    for axis in (0, 1):
        per_offset = torch.bincount(offsets[:, axis], minlength=9).numpy()
        assert stats.chisquare(per_offset).pvalue > 1e-3

    transforms = pytest.importorskip("torchvision.transforms")
    tv = transforms.Compose([transforms.RandomCrop(8, padding=4),
                             transforms.RandomHorizontalFlip()])
    torch.manual_seed(0)
    tv_out = torch.stack([tv(img) for _ in range(10_000)])
    tv_cell = _cell_of(tv_out, candidates)  # same support: every output is one of ours
    tv_counts = torch.bincount(tv_cell, minlength=len(params)).numpy()
    assert stats.chi2_contingency([counts, tv_counts]).pvalue > 1e-3


@pytest.mark.parametrize("mean,std", [(CIFAR10_MEAN, CIFAR10_STD),
                                      (CIFAR100_MEAN, CIFAR100_STD)])
def test_normalize(mean, std):
    x = _random_images(4)
    x[0, :, 0, 0], x[0, :, 0, 1] = 0, 255
    y = normalize(x, mean, std)
    assert y.dtype == torch.float32 and y.shape == x.shape
    for ch in range(3):
        expected = (x[:, ch].double() / 255.0 - mean[ch]) / std[ch]
        torch.testing.assert_close(y[:, ch].double(), expected, atol=1e-5, rtol=0)
