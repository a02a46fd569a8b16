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
    crop_flip_views,
    normalize,
    random_crop_flip,
    sample_crop_flip,
    view_ids,
    view_params,
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


def test_one_channel_28x28_with_padding_2_has_50_views():
    """Fashion-MNIST's augmentation: every one of the 5 x 5 offsets x 2 flips, by id, is the
    crop written out by hand; the ids are 0..49 and invert."""
    x = _random_images(3, c=1, h=28, w=28)
    assert crop_flip_views(2) == 50
    views = torch.arange(50)
    offsets, flips = view_params(views, 2)
    assert torch.equal(view_ids(offsets, flips, 2), views)
    assert sorted({(int(t), int(left)) for t, left in offsets}) == [
        (t, left) for t in range(5) for left in range(5)]
    for v, (top, left), flip in zip(views.tolist(), offsets.tolist(), flips.tolist(),
                                    strict=True):
        out = crop_flip(x, offsets[v].expand(3, 2), flips[v].expand(3), 2)
        crop = F.pad(x, (2, 2, 2, 2))[:, :, top:top + 28, left:left + 28]
        assert torch.equal(out, crop.flip(-1) if flip else crop)


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


# -- the strong view ---------------------------------------------------------------------------


def test_strong_ops_against_their_definitions():
    from kdlab.data.augment import apply_op

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 10, 10, generator=g)
    plus = torch.ones(4, dtype=torch.long)
    assert torch.equal(apply_op("identity", x, 1.0, plus), x)
    torch.testing.assert_close(apply_op("solarize", x, 0.3, plus),
                               torch.where(x >= 0.7, 1 - x, x))
    # brightness with factor 1 + 0.9 m s: a darker image for s = -1
    torch.testing.assert_close(apply_op("brightness", x, 0.5, -plus), (x * 0.55).clamp(0, 1))
    post = apply_op("posterize", x, 1.0, plus)  # 4 bits: 16 levels
    assert len(torch.unique(post)) <= 16
    torch.testing.assert_close(post, torch.round(x * 15) / 15)
    # translate_x by 0.3 * width = 3 pixels to the right, zeros coming in on the left
    shifted = apply_op("translate_x", x, 1.0, -plus)
    expected = torch.zeros_like(x)
    expected[..., 3:] = x[..., :-3]
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=0)


def test_cutout_zeroes_one_square_of_the_given_side():
    from kdlab.data.augment import cutout

    x = torch.ones(500, 1, 16, 16)
    out = cutout(x, 8, generator=torch.Generator().manual_seed(1))
    zeros = (out == 0).sum(dim=(1, 2, 3))
    assert zeros.max() == 64 and zeros.min() >= 16  # a full square, or clipped at a corner
    assert ((out == 0) | (out == 1)).all()


def test_the_strong_view_keeps_shape_and_range_and_differs():
    from kdlab.data.augment import strong_view

    x = torch.rand(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    out = strong_view(x, generator=torch.Generator().manual_seed(3))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.05
    # Cutout (side 16) comes last: every image has an all-zero square of at least 8 x 8
    zero = (out == 0).all(1).float()[:, None]
    assert (torch.nn.functional.avg_pool2d(zero, 8, stride=1) == 1).flatten(1).any(1).all()
