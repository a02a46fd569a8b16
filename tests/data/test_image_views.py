"""Decoding and the views of encoded images (kdlab/data/image_views.py): RandomResizedCrop's
draws, the evaluation crop, per-example seeding, unreadable images."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_jpeg

from kdlab.data.image_views import (
    ViewSpec,
    decode_images,
    random_resized_crop,
    stack_views,
    view,
)


def _jpeg(image: torch.Tensor) -> torch.Tensor:
    return encode_jpeg(image, quality=95)


def test_random_resized_crop_draws_an_area_fraction_and_aspect_in_range():
    rng = np.random.default_rng(0)
    h, w = 120, 90
    for _ in range(300):
        top, left, ch, cw = random_resized_crop(h, w, rng, (0.2, 0.6), (0.5, 2.0))
        assert top >= 0 and left >= 0 and top + ch <= h and left + cw <= w
        # rounding each side to whole pixels moves area and aspect by a few per cent
        assert 0.2 * 0.93 <= ch * cw / (h * w) <= 0.6 * 1.07
        assert 0.5 * 0.9 <= cw / ch <= 2.0 * 1.1


def test_random_resized_crop_falls_back_to_the_centre_with_the_clamped_aspect():
    # the whole area at aspect 1 never fits a 50 x 100 image: the centre 50 x 50 instead
    rng = np.random.default_rng(0)
    assert random_resized_crop(50, 100, rng, (1.0, 1.0), (1.0, 1.0)) == (0, 25, 50, 50)
    assert random_resized_crop(100, 50, rng, (1.0, 1.0), (1.0, 1.0)) == (25, 0, 50, 50)


def test_the_evaluation_view_is_the_centre_crop_of_the_resized_image():
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(3, 20, 30).to(torch.uint8)
    spec = ViewSpec(train=False, crop_size=10, resize_size=20)  # shorter side stays 20
    assert torch.equal(view(image, spec, epoch=0, example_id=0), image[:, 5:15, 10:20])
    # a 40 x 60 image is halved first: the same shape comes out
    big = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    assert view(big, spec, 0, 0).shape == (3, 10, 10)


def test_a_training_view_is_fixed_by_seed_epoch_and_id():
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    spec = ViewSpec(train=True, crop_size=16, resize_size=18, seed=3)
    first = view(image, spec, epoch=2, example_id=7)
    assert torch.equal(view(image, spec, epoch=2, example_id=7), first)
    assert not torch.equal(view(image, spec, epoch=3, example_id=7), first)
    assert not torch.equal(view(image, spec, epoch=2, example_id=8), first)
    other_seed = ViewSpec(train=True, crop_size=16, resize_size=18, seed=4)
    assert not torch.equal(view(image, other_seed, epoch=2, example_id=7), first)


def test_the_training_flip_has_probability_one_half():
    # the whole image at its own aspect: the view is the image or its mirror
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(1))
    spec = ViewSpec(train=True, crop_size=16, resize_size=16, scale=(1.0, 1.0),
                    ratio=(1.0, 1.0))
    flipped = 0
    for i in range(400):
        out = view(image, spec, epoch=0, example_id=i)
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
        flipped += torch.equal(out, image.flip(-1))
    assert abs(flipped - 200) < 4 * math.sqrt(400 * 0.25)  # 4 standard deviations


def test_decoding_reads_jpeg_and_png_and_marks_the_unreadable():
    image = torch.randint(0, 256, (3, 12, 20), dtype=torch.uint8)
    png = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(png, format="PNG")
    good = _jpeg(image)
    encoded = [good, torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8),
               good[: len(good) // 2], torch.tensor([1, 2, 3], dtype=torch.uint8),
               torch.empty(0, dtype=torch.uint8)]
    decoded = decode_images(encoded, "cpu")
    assert decoded[0].shape == (3, 12, 20)
    assert torch.equal(decoded[1], image)  # PNG is lossless
    assert decoded[2:] == [None, None, None]


def test_unreadable_examples_become_grey_images_of_the_mean():
    ok = torch.full((3, 4, 4), 7, dtype=torch.uint8)
    batch, unreadable = stack_views([ok, None], 4, (0.5, 0.25, 1.0))
    assert unreadable.tolist() == [False, True]
    assert torch.equal(batch[0], ok)
    assert batch[1, :, 0, 0].tolist() == [128, 64, 255]  # round(255 x mean)


@pytest.mark.parametrize("size", [(3, 9, 14), (3, 30, 11)])
def test_views_have_the_crop_size_whatever_the_image(size):
    image = torch.randint(0, 256, size, dtype=torch.uint8)
    for train in (True, False):
        out = view(image, ViewSpec(train=train, crop_size=8, resize_size=10), 0, 5)
        assert out.shape == (3, 8, 8) and out.dtype == torch.uint8
