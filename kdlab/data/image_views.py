"""Decoding encoded images (JPEG, PNG) and cutting the views a model sees.

- ``decode_images``: a list of encoded images -> RGB uint8 (3, H, W) tensors on ``device``.
  On a CUDA device the JPEGs are decoded in one batched ``torchvision.io.decode_jpeg`` call
  (nvJPEG); an image that fails there is decoded on its own, then on the CPU
  (``torchvision.io.decode_image``: any JPEG, PNG, greyscale and CMYK ones too). An image
  that no decoder reads is None: the caller counts it (never silently dropped).
- The views (ImageNet's, scaled by ``ViewSpec``'s sizes): the training view is a
  RandomResizedCrop (a crop of a random ``scale`` fraction of the image's area and a random
  aspect ratio from ``ratio``, log-uniform; the whole image, its aspect ratio clamped into
  ``ratio``, when ten draws do not fit) resized to ``crop_size`` x ``crop_size``, then a
  horizontal flip with probability 1/2; the evaluation view resizes the shorter side to
  ``resize_size`` and takes the centre ``crop_size`` x ``crop_size`` crop.
- A training view's draws come from its own generator seeded by (run seed, epoch, global id)
  (``numpy.random.default_rng``): the same example gets the same crop in the same epoch
  whichever process, worker or device decodes it, so a resumed run sees the same views.
- ``stack_views``: views of a batch -> one uint8 (B, 3, crop, crop) tensor and the mask of
  the unreadable examples, whose image is mid-grey (the dataset mean after normalisation ~ 0).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViewSpec:
    """Which view a loader cuts: ``train`` (RandomResizedCrop + flip, seeded by ``seed``,
    the epoch and the example's id) or evaluation (resize + centre crop)."""

    train: bool
    crop_size: int = 224
    resize_size: int = 256
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int = 0


def as_bytes_tensor(data: bytes | Tensor) -> Tensor:
    """Encoded image bytes as a 1-d uint8 tensor (what torchvision's decoders take)."""
    if isinstance(data, Tensor):
        return data
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_image(data: Tensor) -> Tensor | None:
    """One encoded image -> RGB uint8 (3, H, W) on the CPU, or None when it cannot be
    decoded (damaged or truncated data, not an image)."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    if data.numel() == 0:
        return None
    try:
        return tv_decode(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        return None


def _is_jpeg(data: Tensor) -> bool:
    return data.numel() > 3 and bool((data[:3] == torch.tensor([0xFF, 0xD8, 0xFF],
                                                               dtype=torch.uint8)).all())


def decode_images(encoded: list[Tensor], device: torch.device | str = "cpu"
                  ) -> list[Tensor | None]:
    """Encoded images -> RGB uint8 (3, H, W) tensors on ``device`` (None: unreadable); on a
    CUDA device the JPEGs in one batched decode (see the module docstring)."""
    device = torch.device(device)
    if device.type != "cuda":
        return [decode_image(data) for data in encoded]
    from torchvision.io import ImageReadMode, decode_jpeg

    images: list[Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if _is_jpeg(data)]
    try:
        for i, image in zip(jpegs, decode_jpeg([encoded[i] for i in jpegs],
                                               mode=ImageReadMode.RGB, device=device),
                            strict=True):
            images[i] = image
    except RuntimeError:  # one bad image fails the batch: decode them one by one
        for i in jpegs:
            with contextlib.suppress(RuntimeError):
                images[i] = decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=device)
    for i, image in enumerate(images):
        if image is None:  # not a JPEG, or one nvJPEG does not read (CMYK): the CPU decoder
            on_cpu = decode_image(encoded[i])
            images[i] = None if on_cpu is None else on_cpu.to(device, non_blocking=True)
    return images


def random_resized_crop(height: int, width: int, rng: np.random.Generator,
                        scale: tuple[float, float], ratio: tuple[float, float]
                        ) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a RandomResizedCrop of an image of this size
    (see the module docstring)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def view(image: Tensor, spec: ViewSpec, epoch: int, example_id: int) -> Tensor:
    """The uint8 (3, crop, crop) view of one decoded image (see the module docstring)."""
    from torchvision.transforms.v2 import functional as tvf

    size = [spec.crop_size, spec.crop_size]
    if not spec.train:
        resized = tvf.resize(image, [spec.resize_size], antialias=True)
        return tvf.center_crop(resized, size)
    rng = np.random.default_rng([spec.seed, epoch, example_id])
    top, left, h, w = random_resized_crop(image.shape[-2], image.shape[-1], rng, spec.scale,
                                          spec.ratio)
    out = tvf.resized_crop(image, top, left, h, w, size, antialias=True)
    return out.flip(-1) if rng.random() < 0.5 else out


def stack_views(views: list[Tensor | None], crop_size: int, mean: tuple[float, ...],
                device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Views of a batch as one uint8 (B, 3, crop, crop) tensor on ``device``, and the bool
    mask of the unreadable examples (None), which get a mid-grey image of the ``mean``."""
    grey = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8, device=device)
    blank = grey.view(3, 1, 1).expand(3, crop_size, crop_size)
    stacked = torch.stack([blank if v is None else v.to(device) for v in views])
    return stacked, torch.tensor([v is None for v in views], dtype=torch.bool)
