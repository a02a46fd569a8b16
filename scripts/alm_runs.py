"""Shared helpers of the ALM-KD diagnosis / measurement scripts: one run in-process, reused
when its directory already holds ``results.json``; clean-label CE teachers per seed.

The clean-label teacher of a (dataset, seed, split) is a CE run with ``noise=none`` and the
same ``seed``, ``dataset.meta_fraction`` and ``dataset.val_fraction``: the split does not
depend on the noise, so it trains on exactly the same train examples, with their clean labels.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import statistics
from pathlib import Path

WORK = Path("/tmp/kdlab_alm")

DATASETS = {
    "digits": {"data": ["dataset=digits", "student=cnn_small"], "teacher": "cnn",
               "alm": ["method.meta_start=5", "method.meta_every=5"], "epochs": 30},
    "synthetic": {"data": ["dataset=synthetic", "student=mlp_small"], "teacher": "mlp_large",
                  "alm": ["method.meta_start=10", "method.meta_every=10"], "epochs": 100},
}
COMMON = ["trainer=cpu", "trainer.enable_progress_bar=false", "num_threads=1",
          "dataset.val_fraction=0.1"]


def run_cfg(overrides: list[str], run_dir: Path, quiet: bool = True) -> dict:
    from kdlab.config import compose
    from kdlab.train import run

    done = run_dir / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cfg = compose(overrides)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        return run(cfg, run_dir)
    with open(run_dir.parent / "runs.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        return run(cfg, run_dir)


def clean_teacher(dataset: str, seed: int, epochs: int | None = None,
                  work: Path = WORK) -> str:
    """Path of the best checkpoint of a CE teacher trained on the clean train labels."""
    spec = DATASETS[dataset]
    epochs = epochs or spec["epochs"]
    arch = spec["teacher"]
    overrides = [*spec["data"], f"student={arch}", "method=ce", "noise=none", f"seed={seed}",
                 f"trainer.max_epochs={epochs}", *COMMON]
    res = run_cfg(overrides, work / "teachers" / f"{dataset}-{arch}-e{epochs}-s{seed}")
    return res["checkpoints"]["best"]


def method_overrides(dataset: str, method: str, rate: float, seed: int, extra=(),
                     epochs: int | None = None, noise: str = "symmetric") -> list[str]:
    spec = DATASETS[dataset]
    epochs = epochs or spec["epochs"]
    out = [*spec["data"], f"teacher={spec['teacher']}", f"method={method}", f"noise={noise}",
           f"noise.rate={rate}", f"seed={seed}", f"trainer.max_epochs={epochs}", *COMMON]
    if method != "ce":
        out.append(f"teacher.ckpt={clean_teacher(dataset, seed)}")
    if method == "alm_kd":
        out += spec["alm"]
    return out + list(extra)


def mean_std(values, scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"
