"""Files and the console: atomic writes, a lock for shared caches, progress bars.

Atomic writes: a kill at any moment leaves either the old file or the new one. The file gets
the permissions any new file would get under the process umask (a temporary file is created
private, 0600; left like that a shared cache or a colleague's report could not read
results.json, checkpoints or cached teachers).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return _atomic(Path(path), lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return _atomic(Path(path), lambda f: torch.save(obj, f))



@contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` (created) while the block runs: one process of a sweep
    fills a shared cache entry, the others wait and then find it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def progress(description: str, total: int, unit: str, show: bool, done: int = 0):
    """A progress bar on stderr over ``total`` units (``done`` of them already); yields
    ``advance(n)``. The bar ends as one finished line and a newline; when another bar holds
    the line (a lazy build inside Lightning's epoch bar) it is cleared instead."""
    if not show:
        yield lambda n=1: None
        return
    from tqdm.auto import tqdm  # only where a bar is shown (tqdm.auto probes for notebooks)

    with tqdm(total=total, initial=done, desc=description, unit=unit, leave=None) as bar:
        yield bar.update
