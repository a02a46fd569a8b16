"""The run directory: which directories may be written, resume, the metrics log, results.

A finished run (``results.json``) is never written into again (with ``resume=true`` and the
same config it is skipped); an unfinished one (a ``checkpoints/last.ckpt`` without results)
is continued only with ``resume=true`` and the same config (keys that do not change the
experiment, :func:`kdlab.config.not_the_experiment`, may differ). A run started by
``kdlab train`` writes ``resume.sh``: the command that continues it. A run that fails
leaves ``failed.json`` (the error, one line) next to what it wrote, so sweeps and reports
can tell failed runs from finished and unfinished ones. Checkpoints and result files are
written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.plugins.io import TorchCheckpointIO

from .config import changes_the_experiment, hydra_quoted
from .errors import ConfigError
from .io import atomic_torch_save, atomic_write_json, atomic_write_text

log = logging.getLogger("kdlab")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


RESUME_SCRIPT = "resume.sh"


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
        refused = self.refusal(cfg)
        if refused:
            raise refused
        ckpt = self._resume_checkpoint(cfg)
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "failed.json").unlink(missing_ok=True)
        self._write_resume_script()
        if ckpt:
            self._keep_metrics_for_resume()
        return ckpt

    def refusal(self, cfg: DictConfig) -> ConfigError | None:
        """Why ``cfg`` may not run in this directory (None: it may)."""
        finished = finished_run_error(self.path)
        if finished:
            return finished
        if not cfg.get("resume"):
            if self.last_checkpoint.exists() and is_launching_process():
                script = self.path / RESUME_SCRIPT
                how = f"sh {script}" if script.is_file() else "resume=true"
                return ConfigError(f"{self.path} holds an unfinished run (checkpoints/last.ckpt);"
                                   f" continue it with {how} or choose another hydra.run.dir")
            return None
        return self.config_change(cfg)

    def config_change(self, cfg: DictConfig) -> ConfigError | None:
        """resume=true with another experiment than the one this directory holds: refused
        (keys that do not change the experiment, e.g. logger or num_threads, may differ)."""
        saved = self.path / "config.yaml"
        if not saved.exists():
            return None
        before = OmegaConf.to_container(OmegaConf.load(saved))
        now = OmegaConf.to_container(cfg, resolve=True)
        changed = [k for k in _differing_keys(before, now) if changes_the_experiment(k)]
        if not changed:
            return None
        return ConfigError(f"resume=true with another config than the run in {self.path} "
                           f"(differs in: {', '.join(changed[:6])}); use the same overrides")

    def finished_results(self, cfg: DictConfig) -> dict[str, Any] | None:
        """With resume=true, a finished run's results.json (None: not finished, or no
        resume): such a run is skipped, never written into. Another config is refused."""
        done = self.path / "results.json"
        if not (cfg.get("resume") and done.is_file()):
            return None
        changed = self.config_change(cfg)
        if changed:
            raise changed
        return json.loads(done.read_text())

    def _resume_checkpoint(self, cfg: DictConfig) -> str | None:
        if not cfg.get("resume"):
            return None
        if not self.last_checkpoint.exists():
            log.info("resume=true: %s has no checkpoint yet, starting from the beginning",
                     self.path)
            return None
        log.info("resuming from %s", self.last_checkpoint)
        return str(self.last_checkpoint)

    def _write_resume_script(self) -> None:
        """``resume.sh``: the command that continues this run, when it is the Hydra job's own
        run (not an auto-trained teacher's or a generation's run inside it)."""
        if not (HydraConfig.initialized() and is_launching_process()):
            return
        hc = HydraConfig.get()
        # a Hydra app that ran earlier in this process may have left its config behind
        output_dir = OmegaConf.select(hc, "runtime.output_dir", default=None)
        if output_dir is None or Path(output_dir).resolve() != self.path.resolve():
            return
        script = self.path / RESUME_SCRIPT
        atomic_write_text(script, "#!/bin/sh\n"
                          "# Continue this run from its last epoch-end checkpoint (kdlab train "
                          "wrote this file\n# when the run started): sh resume.sh\n"
                          f"cd {shlex.quote(hc.runtime.cwd)} || exit 1\n"
                          f"exec {resume_command(hc)}\n")
        script.chmod(script.stat().st_mode | 0o111)

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
            # Ctrl-C: Lightning turns it into SystemExit
            "status": "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit))
            else "failed",
            "error": f"{type(error).__name__}: {text.splitlines()[0] if text else ''}",
            "host": host()})


def _is_test_row(row: dict[str, str]) -> bool:
    """A row of the final tests (``test/...``, ``test_last/...``, ``teacher0/test/...``):
    logged after the last epoch, with its number; a resumed run logs its own."""
    return any(value and (key.startswith(("test/", "test_last/")) or "/test/" in key)
               for key, value in row.items())


def resume_command(hc: DictConfig) -> str:
    """``<kdlab> train <the job's overrides> hydra.run.dir=<its directory> resume=true``, quoted
    for the shell (run from the job's working directory): a sweep job continues on its own.
    Of Hydra's own settings only the config search path is kept (and hydra.mode=RUN for a
    sweep job, whose config may ask for a sweep, e.g. hparams_search)."""
    args = ["train", *config_dir_args(hc)]
    args += [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") != "resume"]
    args += [o for o in hc.overrides.hydra if o.startswith("hydra.searchpath=")]
    if hc.mode == RunMode.MULTIRUN:
        args.append("hydra.mode=RUN")
    args += [f"hydra.run.dir={hydra_quoted(hc.runtime.output_dir)}", "resume=true"]
    return " ".join(shlex.quote(a) for a in [kdlab_executable(), *args])


def config_dir_args(hc: DictConfig) -> list[str]:
    """``--config-dir DIR`` for each config directory the command line gave."""
    return [arg for source in hc.runtime.config_sources if source.provider == "command-line"
            for arg in ("--config-dir", source.path)]


def kdlab_executable() -> str:
    """The ``kdlab`` script of this Python environment (absolute: the command also works
    where the environment is not activated), else plain ``kdlab``."""
    script = Path(sys.executable).with_name("kdlab")
    return str(script) if script.is_file() else "kdlab"


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
