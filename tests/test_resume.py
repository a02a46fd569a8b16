"""Exact resume: a run stopped in the middle of an epoch -- by SIGKILL in a real process, or
by an error in-process -- and continued with resume=true ends with the same results.json
numbers as the uninterrupted run, and its metrics log covers every epoch once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers.callbacks import Interrupted
from helpers.cli import cli, kdlab_process

from kdlab.config import compose
from kdlab.train import run

TESTS = Path(__file__).resolve().parent
# 1149 train examples / batch 64 = 17 steps per epoch: step 30 is in the middle of epoch 1
COMMON = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=3", "seed=4",
          "teacher.max_epochs=2", "num_threads=1"]
METHODS = {
    "kd": ["method=kd"],
    # the global RNG inside the step: dropout masks must be the same after a resume
    "kd, dropout student": ["method=kd", "student=mlp", "student.dropout=0.5"],
    "alm_kd": ["method=alm_kd", "method.meta_start=1", "method.meta_every=1",
               "noise=symmetric", "noise.rate=0.3"],
    "pskd": ["method=pskd"],
}
STOP = "+callbacks.stop={_target_: helpers.callbacks.StopAt, kill: %s}"


def check_same_results(run_dir: Path, reference: dict) -> None:
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test", "test_last", "val", "best_epoch", "selection"):
        assert results[key] == reference[key], key
    if "mixing" in reference:
        assert results["mixing"] == reference["mixing"]
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    # one val point per epoch (counted from 1), one row of each final test
    assert sorted(int(r["epoch"]) for r in rows if r.get("val/acc")) == [1, 2, 3]
    assert [int(r["epoch"]) for r in rows if r.get("test/acc") or r.get("test_last/acc")] == [
        3, 3]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("resume-cache")
    return {"KDLAB_CACHE_DIR": str(cache), "PYTHONPATH": str(TESTS)}


@pytest.mark.parametrize("method", ["kd", "kd, dropout student", "pskd"])
def test_interrupted_then_resumed_reproduces_the_run(method, tmp_path, env, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", env["KDLAB_CACHE_DIR"])
    args = [*COMMON, *METHODS[method], STOP % "false"]
    reference = run(compose(args), tmp_path / "reference")
    run_dir = tmp_path / "stopped"
    monkeypatch.setenv("KDLAB_TEST_STOP_AT_STEP", "30")
    with pytest.raises(Interrupted):
        run(compose(args), run_dir)
    monkeypatch.delenv("KDLAB_TEST_STOP_AT_STEP")
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert json.loads((run_dir / "failed.json").read_text())["status"] == "failed"
    # without resume=true the unfinished directory is refused; with another config too
    refused = cli("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "resume=true" in refused.stderr
    other = cli("train", *args, "seed=5", "resume=true", f"hydra.run.dir={run_dir}",
                cwd=tmp_path, env=env)
    assert other.returncode == 1 and "differs in: seed" in other.stderr
    resumed = cli("train", *args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                  env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (run_dir / "failed.json").exists()
    check_same_results(run_dir, reference)


def test_sigkill_mid_epoch_then_resume_reproduces_the_run(tmp_path, env, monkeypatch):
    """A real SIGKILL (ALM-KD: the most method state) in a process of its own."""
    monkeypatch.setenv("KDLAB_CACHE_DIR", env["KDLAB_CACHE_DIR"])
    args = [*COMMON, *METHODS["alm_kd"], STOP % "true"]
    reference = run(compose(args), tmp_path / "reference")
    run_dir = tmp_path / "killed"
    killed = kdlab_process("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path,
                           env={**env, "KDLAB_TEST_STOP_AT_STEP": "30"})
    assert killed.returncode == -9
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not (run_dir / "results.json").exists()
    resumed = cli("train", *args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                  env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    check_same_results(run_dir, reference)


def test_a_run_stopped_after_its_last_epoch_resumes_into_the_same_results(tmp_path,
                                                                          monkeypatch):
    """Stopped between the last checkpoint and results.json (e.g. while testing): resuming
    trains nothing, tests, and keeps every row of the metrics log (whose train/ and val/
    columns the resumed process never logs)."""
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    args = ["method=ce", "trainer=cpu", "trainer.enable_progress_bar=false",
            "trainer.max_epochs=2", "num_threads=1"]
    reference = run(compose(args), tmp_path / "run")
    log = tmp_path / "run" / "logs" / "metrics.csv"
    rows = list(csv.DictReader(log.open()))
    (tmp_path / "run" / "results.json").unlink()
    again = run(compose([*args, "resume=true"]), tmp_path / "run")
    for key in ("test", "test_last", "val", "best_epoch", "epochs", "selection"):
        assert again[key] == reference[key], key
    after = list(csv.DictReader(log.open()))
    assert [r for r in after if r.get("train/loss_epoch")] == [
        r for r in rows if r.get("train/loss_epoch")]
    # the final tests once each: the selected epoch (test/) and the last (test_last/)
    assert sum(1 for r in after if r.get("test/acc")) == 1
    assert sum(1 for r in after if r.get("test_last/acc")) == 1
    assert not list(log.parent.glob("metrics.before-resume.csv"))
