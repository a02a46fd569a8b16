"""Class-per-folder trees of small generated JPEGs (the layout of ImageNet's train/ and val/
folders), for the imagefolder and streaming tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import encode_jpeg

# Each class has its own colour (plus noise), so that a tiny model learns something and runs
# that differ in their data order end with different numbers.
COLOURS = torch.tensor([[220, 40, 40], [40, 200, 40], [40, 60, 220], [210, 200, 40],
                        [200, 40, 200], [40, 200, 200]], dtype=torch.float32)


def write_tree(root: Path, classes: int = 4, per_class: int = 40, size: int = 16,
               seed: int = 0, sizes: tuple[int, ...] = ()) -> list[str]:
    """``root/class<k>/img<i>.JPEG``: ``per_class`` images of ``size`` x ``size`` (or, with
    ``sizes``, heights cycling through them: images of different shapes); returns the files
    relative to root in sorted order (their global ids)."""
    g = torch.Generator().manual_seed(seed)
    files = []
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h = sizes[i % len(sizes)] if sizes else size
            noise = torch.randn(3, h, size, generator=g) * 40
            image = (COLOURS[c % len(COLOURS)].view(3, 1, 1) + noise).clamp(0, 255)
            name = f"img{i:03d}.JPEG"
            (folder / name).write_bytes(bytes(encode_jpeg(image.to(torch.uint8), quality=90)
                                              .numpy()))
            files.append(f"class{c}/{name}")
    return files


def truncate(path: Path) -> None:
    """Cut a JPEG 20 bytes into its scan: its header still reads, its data does not decode."""
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"\xff\xda") + 20])
