"""Label noise for the train split: symmetric, symmetric_exclusive, asymmetric, pairflip.

All protocols are deterministic functions of (clean labels, rate, seed), so every DDP rank
and every resume sees the same noisy labels. Each example is corrupted independently with
probability ``rate``; the returned mask marks the examples whose label actually changed
(so for ``symmetric``, where the drawn label may equal the true one, the realised rate is
about ``rate * (1 - 1/C)``).

- symmetric: with probability r, a label drawn uniformly over all C classes.
- symmetric_exclusive: with probability r, a label drawn uniformly over the other C-1 classes.
- asymmetric: with probability r, class c -> class_map[c]. CIFAR-10: truck->automobile,
  bird->airplane, deer->horse, cat<->dog. CIFAR-100: within each superclass (from the coarse
  labels) the next fine class, circularly. Fashion-MNIST: T-shirt/top<->Shirt,
  Pullover<->Coat, Sneaker<->Ankle boot (kdlab's map, below). Other datasets need
  ``class_map``.
- pairflip: with probability r, class c -> (c + 1) mod C.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError

NOISE_TYPES = ("none", "symmetric", "symmetric_exclusive", "asymmetric", "pairflip")

# CIFAR-10 classes: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse,
# 8 ship, 9 truck.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}

# Fashion-MNIST classes: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal,
# 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot. kdlab's own map, not a published one (no
# Fashion-MNIST map could be checked here against a paper's text or its released code): the
# pairs of classes a trained classifier confuses most, matched greedily so that each class
# has at most one partner, and swapped. Measured on the 10,000 test images (1,000 per class)
# with a 3-conv CNN at 90.9 % (4 epochs, crop + flip): confusions counted in both directions,
# T-shirt/top-Shirt 192, Shirt-Coat 133, Pullover-Coat 111, Pullover-Shirt 109, Dress-Shirt
# 66, Sneaker-Ankle boot 59, Coat-Dress 51, Sandal-Sneaker 25; the matching keeps the first,
# third and sixth. Trouser, Dress, Sandal and Bag keep their labels, so the realised rate is
# about 0.6 x noise.rate.
FASHION_MNIST_ASYMMETRIC = {0: 6, 6: 0, 2: 4, 4: 2, 7: 9, 9: 7}


def superclass_ring(fine: Tensor, coarse: Tensor) -> dict[int, int]:
    """Map each fine class to the next fine class of its superclass (circular)."""
    groups: dict[int, set[int]] = {}
    for f, c in zip(fine.tolist(), coarse.tolist(), strict=True):
        groups.setdefault(int(c), set()).add(int(f))
    ring = {}
    for members in groups.values():
        ordered = sorted(members)
        for i, f in enumerate(ordered):
            ring[f] = ordered[(i + 1) % len(ordered)]
    return ring


def check_noise(type: str = "none", rate: float = 0.0) -> float:
    """The rate as a float, or a one-line error naming the fix."""
    if type not in NOISE_TYPES:
        raise ConfigError(f"unknown noise type {type!r}; available: {', '.join(NOISE_TYPES)}")
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise ConfigError(f"noise.rate must be a number in [0, 1], got {rate!r}") from None
    if not 0.0 <= rate <= 1.0:
        raise ConfigError(f"noise.rate must be in [0, 1], got {rate}")
    if type == "none" and rate > 0:
        raise ConfigError(f"noise.rate={rate} with noise=none would train on clean labels; "
                          f"choose the noise type too, e.g. noise=symmetric noise.rate={rate} "
                          f"(types: {', '.join(NOISE_TYPES[1:])})")
    return rate


def apply_label_noise(labels: Tensor, type: str = "none", rate: float = 0.0, *,
                      num_classes: int, seed: int = 0, coarse: Tensor | None = None,
                      class_map: dict | None = None) -> tuple[Tensor, Tensor]:
    """Return (noisy labels, mask of changed labels)."""
    rate = check_noise(type, rate)
    labels = labels.long()
    if type == "none" or rate == 0.0:
        return labels.clone(), torch.zeros(len(labels), dtype=torch.bool)
    g = torch.Generator().manual_seed(int(seed) * 7 + 12345)
    corrupt = torch.rand(len(labels), generator=g) < rate
    noisy = labels.clone()
    if type == "symmetric":
        drawn = torch.randint(0, num_classes, (len(labels),), generator=g)
    elif type == "symmetric_exclusive":
        shift = torch.randint(1, num_classes, (len(labels),), generator=g)
        drawn = (labels + shift) % num_classes
    elif type == "pairflip":
        drawn = (labels + 1) % num_classes
    else:  # asymmetric
        mapping = _asymmetric_map(num_classes, coarse, labels, class_map)
        lookup = torch.arange(num_classes)
        for src, dst in mapping.items():
            lookup[int(src)] = int(dst)
        drawn = lookup[labels]
    noisy[corrupt] = drawn[corrupt]
    return noisy, noisy != labels


def _asymmetric_map(num_classes, coarse, labels, class_map) -> dict[int, int]:
    if class_map:
        return {int(k): int(v) for k, v in class_map.items()}
    if coarse is not None:
        return superclass_ring(labels, coarse)
    raise ConfigError("noise=asymmetric needs a class map for this dataset: set "
                     "noise.class_map={src: dst, ...} (built in for CIFAR-10, CIFAR-100 and "
                     "Fashion-MNIST)")
