"""Exact resume: a run killed with SIGKILL in the middle of an epoch and resumed with
resume=true ends with the same results.json numbers as the uninterrupted run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdlab.config import compose, conf_dir
from kdlab.train import run

COMMON = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=3",
          "dataset.batch_size=8", "seed=4"]
METHODS = {
    "kd": ["method=kd"],
    "alm_kd": ["method=alm_kd", "method.meta_start=1", "method.meta_every=1",
               "noise=symmetric", "noise.rate=0.3"],
    "pskd": ["method=pskd"],
}


def _kdlab(args, cwd, env):
    exe = Path(sys.executable).with_name("kdlab")
    return subprocess.Popen([str(exe), "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_then_resume_reproduces_the_run(method, tmp_path, monkeypatch):
    if not (conf_dir() / "method" / f"{method}.yaml").exists():
        pytest.skip(f"method {method} not available")
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(cache))
    args = COMMON + METHODS[method]
    reference = run(compose(args), tmp_path / "reference")

    run_dir = tmp_path / "killed"
    env = dict(os.environ, WANDB_MODE="disabled", KDLAB_CACHE_DIR=str(cache))
    proc = _kdlab([*args, f"hydra.run.dir={run_dir}"], tmp_path, env)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.4)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (run_dir / "results.json").exists()

    # without resume=true the unfinished directory is not touched
    refused = _kdlab([*args, f"hydra.run.dir={run_dir}"], tmp_path, env)
    out, _ = refused.communicate(timeout=300)
    assert refused.returncode == 1 and "resume=true" in out
    # resume with another config is refused
    other = _kdlab([*args, "seed=5", "resume=true", f"hydra.run.dir={run_dir}"], tmp_path, env)
    out, _ = other.communicate(timeout=300)
    assert other.returncode == 1 and "seed" in out

    resumed = _kdlab([*args, "resume=true", f"hydra.run.dir={run_dir}"], tmp_path, env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test", "test_last", "val", "best_epoch"):
        assert results[key] == reference[key], key
    if "mixing" in reference:
        assert results["mixing"] == reference["mixing"]
    # the metrics log covers every epoch once (+ the re-validation of the best checkpoint)
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    assert sorted(int(r["epoch"]) for r in rows if r.get("val/acc")) == [0, 1, 2, 3]
