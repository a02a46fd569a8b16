"""Batched, device-side augmentation of uint8 image batches.

``random_crop_flip`` is the standard CIFAR augmentation - per example, a crop of the
original size from the zero-padded image at an offset drawn uniformly from
``[0, 2 * padding]`` in each axis, then a horizontal flip with probability 1/2 - i.e. the
distribution of torchvision's per-sample ``RandomCrop(size, padding=p)`` followed by
``RandomHorizontalFlip()``, but for a whole batch at once by index arithmetic (no loop over
examples). The draws come from ``sample_crop_flip`` (the default RNG of the batch's device
unless a generator is given) and can be passed to ``crop_flip`` explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def sample_crop_flip(n: int, padding: int = 4, device: torch.device | str | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Draw per-example crop offsets and flips.

    Returns ``offsets`` (n, 2) long - (top, left) in the padded image, each uniform over
    ``0..2*padding`` - and ``flips`` (n,) bool, each True with probability 1/2.
    """
    if generator is not None:
        device = generator.device
    offsets = torch.randint(0, 2 * int(padding) + 1, (n, 2), device=device, generator=generator)
    flips = torch.randint(0, 2, (n,), device=device, generator=generator).bool()
    return offsets, flips


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    """Crop each image of ``x`` (N, C, H, W) at ``offsets`` from its zero-padded version and
    flip it horizontally where ``flips``; the output has the input's shape and dtype.

    ``out[i, :, r, c] = padded[i, :, top_i + r, left_i + c']`` with ``c' = W-1-c`` if
    flipped else ``c``: a single advanced-indexing gather over the whole batch.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a batch (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    p = int(padding)
    offsets = offsets.to(device=x.device, dtype=torch.long)
    flips = flips.to(device=x.device, dtype=torch.bool)
    if offsets.shape != (n, 2) or flips.shape != (n,):
        raise ValueError("offsets must be (N, 2) and flips (N,) for a batch of N images")
    padded = F.pad(x, (p, p, p, p)) if p > 0 else x
    rows = offsets[:, :1] + torch.arange(h, device=x.device)                  # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flips[:, None], (w - 1) - cols, cols) + offsets[:, 1:]  # (N, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def random_crop_flip(x: Tensor, padding: int = 4, generator: torch.Generator | None = None,
                     return_params: bool = False):
    """Random zero-padded crop + horizontal flip of every image of a uint8 batch.

    Uses ``generator`` if given, else the default RNG of ``x``'s device (so
    ``torch.manual_seed`` / Lightning's seeding make it reproducible). With
    ``return_params`` returns ``(out, offsets, flips)``.
    """
    offsets, flips = sample_crop_flip(len(x), padding, device=x.device, generator=generator)
    out = crop_flip(x, offsets, flips, padding)
    return (out, offsets, flips) if return_params else out


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """uint8 (N, C, H, W) in 0..255 -> float32 ``(x / 255 - mean) / std`` per channel."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.to(torch.float32) / 255.0 - mean_t) / std_t
