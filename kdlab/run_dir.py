"""The run directory: which directories may be written, resume, the metrics log, results.

A finished run (``results.json``) is never written into again; an unfinished one (a
``checkpoints/last.ckpt`` without results) is continued only with ``resume=true`` and the
same config. A run that fails leaves ``failed.json`` (the error, one line) next to what it
wrote, so sweeps and reports can tell failed runs from finished and unfinished ones.
Checkpoints and result files are written atomically.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import socket
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO

from .errors import ConfigError
from .io import atomic_torch_save, atomic_write_json, atomic_write_text

log = logging.getLogger("kdlab")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def finished_run_error(path: Path) -> ConfigError | None:
    if (Path(path) / "results.json").exists():
        return ConfigError(f"{path} already holds a finished run (results.json); choose "
                           "another directory with hydra.run.dir=... or delete it")
    return None


def is_launching_process() -> bool:
    """False in the ranks that a distributed launcher started in addition to rank 0."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def host() -> dict[str, Any]:
    """Where a run ran (a sweep's jobs on a cluster or in parallel workers)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid()}


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.last_checkpoint = self.path / "checkpoints" / "last.ckpt"
        self._kept_metrics: list[Path] = []
        self._resumed_epoch: int | None = None  # set after a resumed fit: join the logs

    def open(self, cfg: DictConfig) -> str | None:
        """Check the directory may be used, create it; the checkpoint to resume from."""
        finished = finished_run_error(self.path)
        if finished:
            raise finished
        ckpt = self._resume_checkpoint(cfg)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "failed.json").unlink(missing_ok=True)
        if ckpt:
            self._keep_metrics_for_resume()
        return ckpt

    def _resume_checkpoint(self, cfg: DictConfig) -> str | None:
        if not cfg.get("resume"):
            if self.last_checkpoint.exists() and is_launching_process():
                raise ConfigError(f"{self.path} holds an unfinished run (checkpoints/last.ckpt);"
                                  " continue it with resume=true or choose another "
                                  "hydra.run.dir")
            return None
        saved = self.path / "config.yaml"
        if saved.exists():
            before = OmegaConf.to_container(OmegaConf.load(saved))
            now = OmegaConf.to_container(cfg, resolve=True)
            changed = [k for k in _differing_keys(before, now) if k != "resume"]
            if changed:
                raise ConfigError(f"resume=true with another config than the run in "
                                  f"{self.path} (differs in: {', '.join(changed[:6])}); use "
                                  "the same overrides")
        if not self.last_checkpoint.exists():
            log.warning("resume=true but %s has no checkpoint yet: starting from scratch",
                        self.path)
            return None
        log.info("resuming from %s", self.last_checkpoint)
        return str(self.last_checkpoint)

    def _keep_metrics_for_resume(self) -> None:
        """Lightning's CSV logger deletes an existing metrics.csv: set the files aside (rows
        already set aside by an earlier resume that did not finish are kept)."""
        for path in self.path.glob("**/metrics.csv"):
            aside = path.with_name("metrics.before-resume.csv")
            if aside.exists():
                _write_rows(aside, _read_rows(aside) + _read_rows(path))
                path.unlink()
            else:
                os.replace(path, aside)
            self._kept_metrics.append(aside)

    def merge_resumed_metrics(self, resumed_from: str) -> None:
        """Rows logged up to the checkpoint's epoch + rows of the continued run, one file.

        The files are joined when the results are written (:meth:`write_results`): until
        then Lightning's CSV logger keeps writing the new file with the columns it knows,
        and rewrites it whole when a new column appears (the test metrics), which would
        fail on rows with columns it never logged (e.g. a run resumed after its last
        epoch logs no train/ or val/ column before testing).
        """
        # the checkpoint's epoch is Lightning's counter (from 0); the log counts from 1
        self._resumed_epoch = torch.load(resumed_from, map_location="cpu",
                                         weights_only=True)["epoch"] + 1

    def _join_kept_metrics(self) -> None:
        epoch = self._resumed_epoch  # the last epoch the checkpoint completed, from 1
        if epoch is None:
            return
        for aside in self._kept_metrics:
            path = aside.with_name("metrics.csv")
            old = [r for r in _read_rows(aside) if r.get("epoch") not in (None, "")
                   and int(float(r["epoch"])) <= epoch and not _is_test_row(r)]
            _write_rows(path, old + (_read_rows(path) if path.exists() else []))
            aside.unlink()
        self._kept_metrics = []
        self._resumed_epoch = None

    def write_config(self, cfg: DictConfig) -> None:
        atomic_write_text(self.path / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    def write_results(self, results: dict[str, Any]) -> None:
        self._join_kept_metrics()
        atomic_write_json(self.path / "results.json", results)

    def record_refusal(self, error: BaseException) -> None:
        """A config refused before the run started: noted in a directory that already
        exists (made by a sweep launcher), nothing created otherwise."""
        if self.path.is_dir() and not finished_run_error(self.path):
            self.write_failed(error)

    def write_failed(self, error: BaseException) -> None:
        text = str(error).strip()
        atomic_write_json(self.path / "failed.json", {
            "status": "interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
            "error": f"{type(error).__name__}: {text.splitlines()[0] if text else ''}",
            "host": host()})


def _is_test_row(row: dict[str, str]) -> bool:
    """A row of the final tests (``test/...``, ``test_last/...``, ``teacher0/test/...``):
    logged after the last epoch, with its number; a resumed run logs its own."""
    return any(value and (key.startswith(("test/", "test_last/")) or "/test/" in key)
               for key, value in row.items())


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    fields = sorted({k for r in rows for k in r})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b), key=str)
                for k in _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
