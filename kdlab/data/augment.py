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


def crop_flip_views(padding: int = 4) -> int:
    """How many distinct outputs crop + flip has: (2p + 1)^2 offsets x 2 flips (162 for
    p = 4)."""
    return (2 * int(padding) + 1) ** 2 * 2


def view_ids(offsets: Tensor, flips: Tensor, padding: int = 4) -> Tensor:
    """The index in ``0 .. crop_flip_views(p) - 1`` of each example's (offset, flip)."""
    side = 2 * int(padding) + 1
    return (offsets[:, 0] * side + offsets[:, 1]) * 2 + flips.long()


def view_params(views: Tensor, padding: int = 4) -> tuple[Tensor, Tensor]:
    """(offsets, flips) of view indices: the inverse of :func:`view_ids`."""
    side = 2 * int(padding) + 1
    flips = (views % 2).bool()
    cell = views // 2
    return torch.stack([cell // side, cell % side], dim=1), flips


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


# -- the strong view: RandAugment + Cutout, batched ---------------------------------------------

# RandAugment's operations (Cubuk et al. 2020) on float images in [0, 1], each applied to a
# whole batch with one magnitude and a random sign per example. Equalize is left out (no
# cheap batched form); its neighbour autocontrast stays.
STRONG_OPS = ("identity", "autocontrast", "brightness", "color", "contrast", "sharpness",
              "posterize", "solarize", "rotate", "shear_x", "shear_y", "translate_x",
              "translate_y")


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """other + factor * (x - other), factor per example, clamped to [0, 1]."""
    return (other + factor.view(-1, 1, 1, 1) * (x - other)).clamp(0, 1)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def apply_op(name: str, x: Tensor, magnitude: float, sign: Tensor) -> Tensor:
    """One RandAugment operation on float images (N, C, H, W) in [0, 1]; ``magnitude`` in
    [0, 1] (RandAugment's m / 10) and ``sign`` (N,) in {-1, 1}."""
    n = x.shape[0]
    s = sign.to(x.dtype) * magnitude
    if name == "identity":
        return x
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-8), x)
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), 1 + 0.9 * s)
    if name == "color":
        gray = x.mean(1, keepdim=True).expand_as(x)
        return _blend(x, gray, 1 + 0.9 * s)
    if name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
        return _blend(x, mean, 1 + 0.9 * s)
    if name == "sharpness":
        kernel = torch.tensor([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=x.dtype,
                              device=x.device) / 13
        c = x.shape[1]
        blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"),
                           kernel.expand(c, 1, 3, 3), groups=c)
        return _blend(x, blurred, 1 + 0.9 * s)
    if name == "posterize":
        levels = 2 ** (8 - int(round(4 * magnitude)))
        return torch.floor(x * (levels - 1) + 0.5) / (levels - 1)
    if name == "solarize":
        return torch.where(x >= 1 - magnitude, 1 - x, x)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    if name == "rotate":
        angle = s * torch.pi / 6  # up to 30 degrees
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle), -torch.sin(angle)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle), torch.cos(angle)
    elif name == "shear_x":
        theta[:, 0, 1] = 0.3 * s
    elif name == "shear_y":
        theta[:, 1, 0] = 0.3 * s
    elif name == "translate_x":
        theta[:, 0, 2] = 2 * 0.3 * s  # up to 30 % of the width (grid coordinates span 2)
    elif name == "translate_y":
        theta[:, 1, 2] = 2 * 0.3 * s
    else:
        raise ValueError(f"unknown augmentation {name!r}")
    return _affine(x, theta)


def rand_augment(x: Tensor, ops: int = 2, magnitude: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """RandAugment: ``ops`` operations drawn uniformly per example, each at ``magnitude``
    with a random sign per example; float images (N, C, H, W) in [0, 1]."""
    n = x.shape[0]
    for _ in range(int(ops)):
        choice = torch.randint(0, len(STRONG_OPS), (n,), device=x.device, generator=generator)
        sign = torch.randint(0, 2, (n,), device=x.device, generator=generator) * 2 - 1
        out = x.clone()
        for k, name in enumerate(STRONG_OPS):
            pick = choice == k
            if pick.any():
                out[pick] = apply_op(name, x[pick], magnitude, sign[pick])
        x = out
    return x


def cutout(x: Tensor, length: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero a ``length`` x ``length`` square (clipped at the borders) at a uniformly drawn
    centre of every image (DeVries & Taylor 2017)."""
    n, _, h, w = x.shape
    cy = torch.randint(0, h, (n, 1, 1), device=x.device, generator=generator)
    cx = torch.randint(0, w, (n, 1, 1), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    half = int(length) // 2
    hole = ((rows >= cy - half) & (rows < cy - half + int(length))
            & (cols >= cx - half) & (cols < cx - half + int(length)))
    return x * (~hole).unsqueeze(1).to(x.dtype)


def strong_view(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The strong view of a float image batch in [0, 1]: random crop + flip, RandAugment(2,
    full magnitude), Cutout of half the image side."""
    x = crop_flip(x, *sample_crop_flip(len(x), padding=max(1, x.shape[-1] // 8),
                                       device=x.device, generator=generator),
                  padding=max(1, x.shape[-1] // 8))
    x = rand_augment(x, ops=2, magnitude=1.0, generator=generator)
    return cutout(x, max(1, x.shape[-1] // 2), generator=generator)
