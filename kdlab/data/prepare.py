"""``kdlab data prepare SOURCE OUT``: a class-per-folder image tree -> LitData chunks that
``dataset=streaming`` reads, from a local folder or an object store.

The examples are the tree's images in sorted (class, file) order (``image_tree.py``): the
example with global id i is item i of the chunks. Each item is ``{id, label, jpeg}``: the
file's own bytes, unchanged, except for images that are not RGB or greyscale JPEGs (PNG,
CMYK JPEG: ImageNet's train set has a few), which are re-encoded once as RGB JPEG (quality
95) so that every item decodes on a GPU. The chunks are written by ``litdata.optimize``
(``workers`` processes, each a contiguous slice of the ids, in order; chunks of at most
``chunk_bytes``), with LitData's checkpoints: an interrupted prepare (Ctrl-C, a kill, a
crash) run again with the same SOURCE and OUT continues from its last finished chunk and
ends with the chunks an uninterrupted one writes.

OUT/kdlab.json, written last (its presence means the chunks are complete), records what the
reader checks and needs: the format and its version (``FORMAT``, ``VERSION``), the class
names, every id's label and file name, and the ids that were re-encoded. While a prepare is
under way OUT/.kdlab-prepare.json says which tree it is writing, so that a second run knows
whether to continue (the same tree) or start again (the tree changed since); OUT must
otherwise be empty or not exist, and a finished OUT is never written again.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, atomic_write_text
from .download import DatasetError
from .encoded import digest_of
from .image_tree import ImageTree, check_image_headers, scan_image_tree

FORMAT = "kdlab-image-chunks"
VERSION = 1
MANIFEST = "kdlab.json"
IN_PROGRESS = ".kdlab-prepare.json"
DEFAULT_CHUNK_BYTES = "64MB"


def prepared_item(entry: list) -> dict[str, Any]:
    """One chunk item from ``[id, path, label, re-encode]`` (runs in LitData's workers)."""
    example_id, path, label, reencode = entry
    data = Path(path).read_bytes()
    if reencode:
        data = rgb_jpeg(data)
    return {"id": int(example_id), "label": int(label), "jpeg": data}


def rgb_jpeg(data: bytes) -> bytes:
    """``data`` (any image PIL reads) re-encoded as an RGB JPEG; unchanged if it cannot be
    decoded (training then counts it as unreadable)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            out = io.BytesIO()
            image.convert("RGB").save(out, format="JPEG", quality=95)
    except (OSError, ValueError, SyntaxError):
        return data
    return out.getvalue()


def _tree_record(tree: ImageTree, reencoded: list[int], workers: int, chunk_bytes: str
                 ) -> dict[str, Any]:
    return {"source": str(tree.root.resolve()),
            "tree": digest_of(tree.classes, tree.files, reencoded),
            "workers": workers, "chunk_bytes": chunk_bytes}


def _finished(out: Path, tree: ImageTree) -> dict[str, Any] | None:
    """The manifest of OUT when it holds this tree's finished chunks (None: no manifest);
    chunks of anything else are refused, never written over."""
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = {}
    if (manifest.get("source") == str(tree.root.resolve())
            and manifest.get("files") == list(tree.files)):
        print(f"kdlab: {out} already holds the chunks of {tree.root}", file=sys.stderr)
        return manifest
    raise DatasetError(f"{out} already holds prepared chunks of "
                       f"{manifest.get('source', 'another tree')} ({MANIFEST}); choose another "
                       "OUT, or delete it to prepare again")


def _start_state(out: Path, record: dict[str, Any]) -> str:
    """``fresh`` (nothing there), ``continue`` (an interrupted prepare of this tree) or
    ``restart`` (an interrupted prepare of another state of the tree); refuses anything
    else in OUT."""
    if not out.exists():
        return "fresh"
    if not out.is_dir():
        raise DatasetError(f"OUT {out} is a file; give a directory that does not exist or is "
                           "empty")
    marker = out / IN_PROGRESS
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            recorded = {}
        if recorded.get("source") != record["source"]:
            raise DatasetError(f"{out} holds an unfinished prepare of another tree "
                               f"({recorded.get('source', 'unknown')}); finish it with that "
                               "SOURCE, or delete OUT")
        return "continue" if recorded.get("tree") == record["tree"] else "restart"
    if any(out.iterdir()):
        raise DatasetError(f"OUT {out} is not empty and holds no prepare of kdlab's; give a "
                           "new or empty directory")
    return "fresh"


def _clear_unfinished(out: Path) -> None:
    """Remove what an interrupted prepare of ours wrote (chunks, indexes, checkpoints)."""
    for entry in out.iterdir():
        if entry.name == ".checkpoints":
            shutil.rmtree(entry)
        elif entry.suffix in (".bin", ".json") and entry.name != IN_PROGRESS:
            entry.unlink()


def _check_items(out: Path, n: int) -> int:
    """The written chunks hold items 0..n-1 with ids 0..n-1 in order (each chunk's first and
    last item read back); returns the number of chunks."""
    from litdata import StreamingDataset

    index = json.loads((out / "index.json").read_text())
    sizes = [int(c["chunk_size"]) for c in index["chunks"]]
    dataset = StreamingDataset(str(out))
    if sum(sizes) != n or len(dataset) != n:
        raise DatasetError(f"{out} holds {sum(sizes)} items, not the tree's {n}; delete it and "
                           "prepare again")
    start = 0
    for size in sizes:
        for position in (start, start + size - 1):
            if int(dataset[position]["id"]) != position:
                raise DatasetError(f"item {position} of {out} is not example {position}; "
                                   "delete it and prepare again")
        start += size
    return len(sizes)


def prepare(source: str | Path, out: str | Path, workers: int | None = None,
            chunk_bytes: str = DEFAULT_CHUNK_BYTES, show_progress: bool = True
            ) -> dict[str, Any]:
    """Write the chunks of the tree ``source`` into ``out`` (see the module docstring);
    returns the manifest written as OUT/kdlab.json."""
    import litdata

    tree = scan_image_tree(source, what="SOURCE")
    out = Path(out).expanduser()
    finished = _finished(out, tree)
    if finished is not None:
        return finished
    reencoded = check_image_headers(tree, show_progress=show_progress)
    workers = min(max(1, int(workers or min(8, os.cpu_count() or 1))), len(tree))
    record = _tree_record(tree, reencoded, workers, str(chunk_bytes))
    state = _start_state(out, record)
    if state == "continue":
        recorded = json.loads((out / IN_PROGRESS).read_text())
        workers, chunk_bytes = int(recorded["workers"]), str(recorded["chunk_bytes"])
        print(f"kdlab: continuing the interrupted prepare in {out} ({workers} workers, chunks "
              f"of {chunk_bytes})", file=sys.stderr)
        record = _tree_record(tree, reencoded, workers, chunk_bytes)
    elif state == "restart":
        print(f"kdlab: {tree.root} changed since the interrupted prepare in {out}: starting "
              "over", file=sys.stderr)
        _clear_unfinished(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / IN_PROGRESS, record)
    convert = set(reencoded)
    # lists, not tuples: LitData compares them with its checkpoint's JSON copy on resume
    inputs = [[i, str(tree.root / name), int(label), i in convert]
              for i, (name, label) in enumerate(zip(tree.files, tree.labels, strict=True))]
    if not (out / "index.json").is_file():  # else LitData finished before the interruption
        litdata.optimize(fn=prepared_item, inputs=inputs, output_dir=str(out),
                         chunk_bytes=chunk_bytes, num_workers=workers, use_checkpoint=True,
                         keep_data_ordered=True, reorder_files=False, verbose=show_progress,
                         # workers forked from this process start at once (no re-import)
                         start_method="fork" if sys.platform == "linux" else None)
    chunks = _check_items(out, len(tree))
    manifest = {"format": FORMAT, "version": VERSION, "litdata": litdata.__version__,
                "source": str(tree.root.resolve()), "num_examples": len(tree),
                "num_chunks": chunks, "classes": list(tree.classes),
                "labels": tree.labels.tolist(), "files": list(tree.files),
                "reencoded": reencoded}
    atomic_write_text(out / MANIFEST, json.dumps(manifest))  # compact: 1.28 M file names
    (out / IN_PROGRESS).unlink()
    return manifest
