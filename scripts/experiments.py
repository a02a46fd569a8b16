"""What the evidence scripts share: runs keyed by their resolved config, run in worker
processes, reused when finished and resumed in place when interrupted.

    from experiments import execute, Run
    done = execute([Run({"row": "kd", "seed": 0}, ["method=kd", "seed=0"]), ...], work, jobs=2)

A run's directory is ``<work>/runs/<hash of its resolved config>``: a changed default (or any
other change of the config) never reuses a run made with the old one. A directory holding
``results.json`` is reused as it is; one holding an unfinished run (``checkpoints/last.ckpt``)
continues from its last epoch-end checkpoint (``resume=true``), so a script stopped halfway
picks up where it was when started again with the same ``--work``. ``execute(...,
train=False)`` trains nothing and returns the runs that have finished (a table of what is done
while a long script is still running, or after it was stopped). Every run goes through
``kdlab.pipeline.run`` in-process, fp32 on the CPU (``trainer=cpu``), one torch thread per worker,
its output appended to ``<work>/runs.log``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every evidence run: CPU, fp32, deterministic, no progress bar, one thread per worker.
COMMON = ["trainer=cpu", "trainer.enable_progress_bar=false", "num_threads=1"]


@dataclass
class Run:
    """One run of a table: its labels (setting, row, seed, ...) and its overrides."""

    labels: dict[str, Any]
    overrides: list[str]
    results: dict[str, Any] | None = field(default=None, repr=False)
    run_dir: str = ""


def run_key(cfg) -> str:
    """A hash of the whole resolved config, ``resume`` left out (it does not change a run)."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("resume", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class NotFinished(Exception):
    """A run that has not finished, met with ``train=False``."""


def run_one(overrides: list[str], work: str, train: bool = True) -> tuple[str, dict[str, Any]]:
    """Run ``overrides`` in this process, or reuse / resume it: (run dir, results.json);
    with ``train=False`` an unfinished run raises :class:`NotFinished` instead."""
    os.environ["KDLAB_CACHE_DIR"] = str(Path(work) / "cache")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from kdlab.config import compose

    cfg = compose([*COMMON, *overrides])
    run_dir = Path(work) / "runs" / run_key(cfg)
    done = run_dir / "results.json"
    if not done.exists():
        if not train:
            raise NotFinished(str(run_dir))
        from kdlab.pipeline import run

        for name in ("lightning", "pytorch_lightning", "kdlab"):
            logging.getLogger(name).setLevel(logging.WARNING)
        if (run_dir / "checkpoints" / "last.ckpt").exists():
            cfg.resume = True  # an interrupted attempt: continue it
        for stale in ("failed.json", "error.log"):
            (run_dir / stale).unlink(missing_ok=True)
        with open(Path(work) / "runs.log", "a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            run(cfg, run_dir)
    return str(run_dir), json.loads(done.read_text())


def run_or_fail(overrides: list[str], work: str) -> tuple[str, dict[str, Any] | None, str]:
    """:func:`run_one`, with a failure caught: (run dir, results or None, the error line)."""
    try:
        return (*run_one(overrides, work), "")
    except Exception as e:  # one failed run must not stop the others
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return "", None, f"{type(e).__name__}: {first}"


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def execute(runs: list[Run], work: Path, jobs: int = 1, train: bool = True) -> list[Run]:
    """Run (or reuse) every run, ``jobs`` at a time, printing one line per finished run with
    the time so far and an estimate of the time left; returns the runs that finished, with
    their results (a failed run is reported and left out: start the script again to retry
    it). With ``train=False`` nothing runs: the finished runs are returned, and the others
    counted."""
    if not train:  # an error other than an unfinished run (a bad override) is raised
        for run in runs:
            with contextlib.suppress(NotFinished):
                run.run_dir, run.results = run_one(run.overrides, str(work), train=False)
        done = [r for r in runs if r.results is not None]
        print(f"{len(done)} of {len(runs)} runs finished in {work} (the others left out: "
              "nothing trained)", flush=True)
        return done
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    pool = ProcessPoolExecutor(jobs) if jobs > 1 else None
    try:
        outs = (pool.map(run_or_fail, [r.overrides for r in runs], [str(work)] * len(runs))
                if pool else (run_or_fail(r.overrides, str(work)) for r in runs))
        failed = []
        for i, (run, (run_dir, results, error)) in enumerate(zip(runs, outs, strict=True), 1):
            run.run_dir, run.results = run_dir, results
            spent = time.time() - start
            left = spent / i * (len(runs) - i)
            labels = " ".join(str(v) for v in run.labels.values())
            outcome = (f"FAILED: {error}" if results is None else
                       f"val acc {results['val']['acc']:.4f} test acc {results['test']['acc']:.4f}")
            print(f"[{i}/{len(runs)} {_duration(spent)}, ~{_duration(left)} left] {labels}: "
                  f"{outcome}", flush=True)
            if results is None:
                failed.append(f"{labels}: {error}")
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if failed:
        print(f"{len(failed)} runs failed (left out of the tables):\n  " + "\n  ".join(failed),
              flush=True)
    return [r for r in runs if r.results is not None]
