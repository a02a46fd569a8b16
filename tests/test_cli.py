"""End to end through the real `kdlab` console script (few, fat tests: each pays ~7 s start-up).

The numbers in results.json are checked against an independent evaluation of the saved
best checkpoint, and a CE run's checkpoint is used as a teacher.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_kdlab

from kdlab.data.digits import DigitsDataModule
from kdlab.models import build_model
from kdlab.models.loading import load_weights

FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "num_threads=1"]


def kdlab(*args: str, cwd: Path, check: bool = True):
    return run_kdlab(*args, cwd=cwd, check=check)


def hand_ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for b in range(n_bins):
        sel = (conf > b / n_bins) & (conf <= (b + 1) / n_bins)
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == y[sel]).mean() - conf[sel].mean())
    return float(ece)


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "ce"
    kdlab("train", "method=ce", "student=cnn", "trainer.max_epochs=4", "seed=3",
          f"hydra.run.dir={run_dir}", *FAST, cwd=root)
    return root, run_dir


def test_ce_run_directory_and_results(ce_run):
    _, run_dir = ce_run
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("method", "dataset", "seed", "best_epoch", "test", "test_last", "val",
                "teachers", "wall_time_s", "noise"):
        assert key in results
    assert results["method"] == "ce" and results["dataset"] == "digits" and results["seed"] == 3
    assert results["teachers"] == []
    for split in ("test", "test_last", "val"):
        assert 0.0 <= results[split]["acc"] <= 1.0 and 0.0 <= results[split]["ece"] <= 1.0
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(results["checkpoints"]["best"]).is_file()
    assert (run_dir / "reliability_test.png").stat().st_size > 1000
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    assert {"train/loss_ce", "train/loss_epoch", "val/acc", "val/ece"} <= set(rows[0])
    val_acc = [float(r["val/acc"]) for r in rows if r["val/acc"]]
    # 4 epochs, then one re-validation of the best checkpoint after fit
    assert len(val_acc) == 5
    # best = the epoch with the highest validation accuracy (never the test set)
    assert results["best_epoch"] == int(np.argmax(val_acc[:4]))
    assert results["val"]["acc"] == pytest.approx(max(val_acc[:4]), abs=1e-6)
    assert val_acc[4] == pytest.approx(max(val_acc[:4]), abs=1e-6)


def test_results_match_an_independent_evaluation_of_the_best_checkpoint(ce_run):
    _, run_dir = ce_run
    results = json.loads((run_dir / "results.json").read_text())
    model = build_model("cnn", 10, (1, 8, 8), width=32)
    load_weights(model, results["checkpoints"]["best"])
    dm = DigitsDataModule(seed=3)
    dm.setup()
    test = dm.splits["test"]
    with torch.no_grad():
        probs = torch.softmax(model.eval()(test.inputs).double(), 1).numpy()
    y = test.targets.numpy()
    assert results["test"]["acc"] == pytest.approx(float((probs.argmax(1) == y).mean()), abs=1e-6)
    assert results["test"]["ece"] == pytest.approx(hand_ece(probs, y), abs=1e-5)
    nll = float(-np.log(probs[np.arange(len(y)), y]).mean())
    assert results["test"]["nll"] == pytest.approx(nll, rel=1e-4)


def test_ce_checkpoint_is_a_teacher_and_kd_logs_terms(ce_run):
    root, ce_dir = ce_run
    ce = json.loads((ce_dir / "results.json").read_text())
    run_dir = root / "kd"
    out = kdlab("train", "method=kd", "teacher=cnn", f"teacher.ckpt={ce_dir}/checkpoints/last.ckpt",
                "trainer.max_epochs=2", "seed=3", f"hydra.run.dir={run_dir}", *FAST, cwd=root)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "kd"
    # the teacher row is the CE run's last-epoch weights evaluated on the same test set
    assert results["teachers"][0]["arch"] == "cnn"
    assert results["teachers"][0]["test"]["acc"] == pytest.approx(ce["test_last"]["acc"], abs=1e-6)
    assert 0.0 <= results["teachers"][0]["agreement"] <= 1.0
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    assert {"train/loss_ce", "train/loss_kd"} <= set(rows[0])
    assert "teacher cnn" in out.stdout and "student cnn_small" not in out.stdout
    # a finished run directory is never overwritten
    again = kdlab("train", "method=ce", f"hydra.run.dir={run_dir}", *FAST, cwd=root, check=False)
    assert again.returncode != 0 and "already holds a finished run" in again.stderr
    assert json.loads((run_dir / "results.json").read_text()) == results


def test_clear_errors(tmp_path):
    empty = tmp_path / "nodata"
    out = kdlab("train", "dataset=cifar100", "dataset.download=false", f"paths.data_dir={empty}",
                "method=ce", "student=resnet8", *FAST, f"hydra.run.dir={tmp_path / 'r'}",
                cwd=tmp_path, check=False)
    assert out.returncode == 1
    err = [line for line in out.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert len(err) == 1 and str(empty / "cifar100") in err[0] and "download" in err[0]
    assert "Traceback" not in out.stderr
    out = kdlab("train", "method=nope", cwd=tmp_path, check=False)
    assert out.returncode == 1 and "nope" in out.stderr and "kd" in out.stderr


def test_help_lists_groups_and_methods(tmp_path):
    out = kdlab("train", "--help", cwd=tmp_path)
    for group in ("dataset:", "method:", "student:", "teacher:", "noise:", "trainer:", "logger:"):
        assert group in out.stdout
    assert "resnet32x4" in out.stdout and "kdlab train" in out.stdout
    out = kdlab("methods", cwd=tmp_path)
    assert "kd " in out.stdout and "ce " in out.stdout
