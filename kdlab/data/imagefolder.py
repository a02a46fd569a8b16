"""``dataset=imagefolder``: a class-per-folder image tree read as it is, no preparation.

For trees small enough to list and open file by file (Tiny-ImageNet, a subset of ImageNet,
your own photos); for ImageNet itself prepare chunks once and stream them
(``kdlab data prepare``, ``dataset=streaming``). Ids, splits, labels, decoding and views are
``encoded.py``'s; this file only lists the tree (``image_tree.py``: every image's header is
checked before training, so a file that is no image stops the run with one line before
anything is written) and reads its files.

Every split is read by id (``EncodedImageDataModule.make_loader``): batches of rows from
``base.BatchSampler``, shuffled from (seed, epoch) and sharded over DDP ranks, read and
decoded in the loader's workers; order and views depend on (seed, epoch) only, so a run
resumed from an epoch-end checkpoint reads what the uninterrupted run read.
"""

from __future__ import annotations

from pathlib import Path

from .encoded import Catalog, EncodedImageDataModule, digest_of
from .image_tree import ImageTree, check_image_headers, scan_image_tree


def read_file(path: Path) -> bytes:
    """A file's bytes; b"" when it cannot be read (then counted as unreadable)."""
    try:
        return path.read_bytes()
    except OSError:
        return b""


class FileReader:
    """``read(id)``: the bytes of the tree's file ``id``."""

    def __init__(self, root: Path, files: tuple[str, ...]):
        self.root, self.files = root, files

    def __call__(self, example_id: int) -> bytes:
        return read_file(self.root / self.files[example_id])


class ImageFolderDataModule(EncodedImageDataModule):
    name = "imagefolder"
    source_kind = "class-per-folder image tree (dataset.path=DIR: DIR/<class>/<image>)"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._trees: dict[str, ImageTree] = {}
        self._headers_checked: set[str] = set()

    def read_catalog(self, source: str) -> Catalog:
        where = self.path if source == "train" else self.test_path
        tree = scan_image_tree(where, what="dataset.path" if source == "train"
                               else "dataset.test_path")
        self._trees[source] = tree
        return Catalog(str(tree.root), tree.classes, tree.labels, tree.files, str(tree.root),
                       digest_of(tree.root.resolve(), tree.classes, tree.files))

    def check(self) -> None:
        """The trees' layout, and every image's header (once per datamodule)."""
        super().check()
        for source in ("train", "test") if self.test_path else ("train",):
            if source not in self._headers_checked:
                self.catalog(source)
                check_image_headers(self._trees[source])
                self._headers_checked.add(source)

    def reader(self, source: str) -> FileReader:
        catalog = self.catalog(source)
        return FileReader(Path(catalog.origin), catalog.files)
