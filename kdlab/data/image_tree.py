"""A class-per-folder image tree (ImageNet's and Tiny-ImageNet's train layout):
``ROOT/<class>/<image>``, one folder per class, the class names sorted into labels 0..C-1.

``scan_image_tree`` lists it: every image file (``IMAGE_SUFFIXES``, any case; ImageNet's
``.JPEG`` included) in sorted (class, file name) order, so that an example's **global id**
is its position in that list: stable for a given tree, whatever the run, the seed or the
number of processes. Files directly under ROOT, hidden entries and other suffixes are left
out. An empty tree, or a class folder without images, is one ``DatasetError`` line.

``check_image_headers`` is the cheap check run on every image before any work (``kdlab data
prepare``, and ``dataset=imagefolder`` before training): the image's header must say what
it is (PIL reads only the first bytes). A file that passes but whose data is damaged
further on (a truncated JPEG) is found when it is decoded, and counted then.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import progress
from .download import DatasetError, _one_line

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class ImageTree:
    """The examples of a tree: ``files[i]`` (``class/name``, relative to the root) and
    ``labels[i]`` for global id ``i``; ``classes[label]`` is the folder name."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.files)


def scan_image_tree(root: str | Path, what: str = "image tree") -> ImageTree:
    """The examples of the class-per-folder tree at ``root`` (see the module docstring)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{what} {root} is not a directory; give a folder with one "
                           "sub-folder of images per class (ROOT/<class>/<image>.JPEG)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DatasetError(f"{what} {root} has no class folders; it must hold one sub-folder "
                           "of images per class (ROOT/<class>/<image>.JPEG)")
    files: list[str] = []
    labels: list[int] = []
    empty = []
    for label, folder in enumerate(folders):
        images = sorted(p.name for p in folder.iterdir() if p.is_file()
                        and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            empty.append(folder.name)
        files += [f"{folder.name}/{name}" for name in images]
        labels += [label] * len(images)
    if empty:
        raise DatasetError(
            f"{what} {root}: {len(empty)} class folder(s) hold no images "
            f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); every class needs "
            f"images ({'/'.join(IMAGE_SUFFIXES)}): remove the folder or add its images")
    return ImageTree(root, tuple(p.name for p in folders), tuple(files),
                     np.asarray(labels, dtype=np.int64))


def image_header(data: bytes) -> tuple[str | None, bool]:
    """(why ``data`` is not an image PIL can identify from its header, or None; whether it
    is something else than an RGB or greyscale JPEG, which GPU decoders may not read)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        return "empty file", False
    try:
        with Image.open(io.BytesIO(data)) as image:
            other = image.format != "JPEG" or image.mode not in ("RGB", "L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        return _one_line(e) or type(e).__name__, False
    return None, other


HEADER_BYTES = 1 << 16  # enough for a JPEG's or PNG's header and its first markers


def _read_header(path: Path) -> tuple[str | None, bool]:
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        return f"cannot be read ({_one_line(e)})", False
    found = image_header(head)
    if found[0] is not None and len(head) == HEADER_BYTES:  # a header longer than the probe
        found = image_header(path.read_bytes())
    return found


def check_image_headers(tree: ImageTree, show_progress: bool = False,
                        threads: int = 8) -> list[int]:
    """Every image's header (``image_header``), read in ``threads`` threads; the bad ones
    are one ``DatasetError`` line naming the first few and the fix. Returns the ids of the
    images that are not RGB or greyscale JPEGs (PNG, CMYK JPEG, ...)."""
    bad: list[tuple[str, str]] = []
    others: list[int] = []
    with progress(f"checking the images of {tree.root}", len(tree), "image",
                  show_progress) as advance, ThreadPoolExecutor(threads) as pool:
        headers = pool.map(_read_header, (tree.root / f for f in tree.files))
        for i, (name, (reason, other)) in enumerate(zip(tree.files, headers, strict=True)):
            if reason is not None:
                bad.append((name, reason))
            elif other:
                others.append(i)
            advance(1)
    if bad:
        listed = "; ".join(f"{name}: {reason}" for name, reason in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise DatasetError(f"{len(bad)} file(s) in {tree.root} are not readable images: "
                           f"{listed}{more}; delete or replace them")
    return others
