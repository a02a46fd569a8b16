"""The teachers' logits for every (train example, augmented view) of an enumerable
augmentation (CIFAR's crop + flip: 162 views): ``teacher_cache=views``, built once per sweep
and looked up by the view each example got (:class:`kdlab.teachers.Teachers` decides when).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .io import atomic_write_json, file_lock, progress
from .methods.base import Outputs


class ViewCache:
    """Every teacher's logits for every (train example, augmented view): a (K, N, V, C)
    table in a memory-mapped file, built view by view (resumable: ``<name>.json`` records
    how many views are done) under a file lock, so that the jobs of a sweep build it once.

    Stored in the teachers' output precision: bfloat16 under bf16-mixed (the teachers' logits
    are bfloat16 values there, so nothing is lost), float32 otherwise.
    """

    def __init__(self, path: Path, shape: tuple[int, int, int, int], dtype: torch.dtype):
        self.path, self.shape, self.dtype = Path(path), tuple(shape), dtype
        self.meta_path = self.path.with_suffix(".json")
        self.table: Tensor | None = None

    def _meta(self) -> dict[str, Any]:
        expected = {"shape": list(self.shape), "dtype": str(self.dtype), "version": __version__}
        if self.meta_path.is_file() and self.path.is_file():
            meta = json.loads(self.meta_path.read_text())
            if {k: meta.get(k) for k in expected} == expected:
                return meta
        return {**expected, "views_done": 0}

    def build(self, fill_view: Callable[[int, Tensor], None], show_progress: bool) -> bool:
        """Fill the views not done yet (``fill_view(v, table)`` writes view v); True if the
        table was complete already."""
        numel = int(torch.Size(self.shape).numel())
        with file_lock(self.path.with_suffix(".lock")):
            meta = self._meta()
            if meta["views_done"] == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "wb") as f:  # a sparse file of the final size
                    f.truncate(numel * torch.empty(0, dtype=self.dtype).element_size())
            table = torch.from_file(str(self.path), shared=True, size=numel,
                                    dtype=self.dtype).view(self.shape)
            complete = meta["views_done"] == self.shape[2]
            with progress("teacher logits (every augmented view, once)", self.shape[2], "view",
                           show_progress and not complete, done=meta["views_done"]) as advance:
                for v in range(meta["views_done"], self.shape[2]):
                    fill_view(v, table)
                    meta["views_done"] = v + 1
                    atomic_write_json(self.meta_path, meta)
                    advance(1)
        self.table = table
        return complete

    def lookup(self, index: Tensor, views: Tensor) -> list[Outputs]:
        at = torch.stack([index, views]).cpu()  # one device-to-host copy per step
        rows = self.table[:, at[0], at[1]]  # (K, B, C)
        return [Outputs(r.to(index.device, torch.float32)) for r in rows]
