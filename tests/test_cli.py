"""End to end through the `kdlab` command (in-process through kdlab.cli.main; the console
script itself in a subprocess once).

The numbers in results.json are checked against an independent evaluation of the saved
best checkpoint, and a CE run's checkpoint is used as a teacher.
"""

from __future__ import annotations

import csv
import json
import os
import stat
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import cli, kdlab_process
from helpers.metrics import hand_ece
from helpers.runs import FAST

from kdlab.config import conf_dir
from kdlab.data.digits import DigitsDataModule
from kdlab.metrics import RESULT_METRICS
from kdlab.models import build_model
from kdlab.models.loading import load_weights


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run_dir = root / "ce"
    old = os.umask(0o022)
    try:
        out = cli("train", "method=ce", "student=cnn", "trainer.max_epochs=4", "seed=3",
                  f"hydra.run.dir={run_dir}", *FAST, cwd=root)
    finally:
        os.umask(old)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run_dir, out


def test_ce_run_directory_and_results(ce_run):
    _, run_dir, out = ce_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "ce" and results["dataset"] == "digits" and results["seed"] == 3
    # SmallCNN(width=32) on 1x8x8: conv 1*32*9, BN 2*32, conv 32*64*9, BN 2*64, linear 64*10+10
    params = 288 + 64 + 18432 + 128 + 650
    assert results["student"] == {"name": "cnn", "arch": "SmallCNN", "params": params}
    assert results["teachers"] == []
    assert (run_dir / "config.yaml").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert Path(results["checkpoints"]["best"]).is_file()
    assert (run_dir / "reliability_test.png").stat().st_size > 1000
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    assert {"train/loss_ce", "train/loss_epoch", "val/acc", "val/ece"} <= set(rows[0])
    # one clean history: one val point per epoch, epochs counted from 1 ...
    val = [r for r in rows if r["val/acc"]]
    assert [int(r["epoch"]) for r in val] == [1, 2, 3, 4]
    # ... no value logged twice for one epoch (per-step values: for one step)
    logged = Counter((key, r["step"] if key.endswith("_step") else r["epoch"])
                     for r in rows for key, value in r.items()
                     if value and key not in ("epoch", "step"))
    assert max(logged.values()) == 1, [k for k, n in logged.items() if n > 1]
    # best = the highest val acc, ties broken by the lower val NLL, then the later epoch
    acc, nll = ([float(r[key]) for r in val] for key in ("val/acc", "val/nll"))
    best = max(range(4), key=lambda i: (acc[i], -nll[i], i)) + 1
    assert results["best_epoch"] == results["selection"]["epoch"] == best
    assert results["val"]["acc"] == acc[best - 1] and results["val"]["nll"] == nll[best - 1]
    # the final test numbers: once each, under their own keys, equal to results.json's
    (test_row,) = [r for r in rows if r["test/acc"]]
    (last_row,) = [r for r in rows if r["test_last/acc"]]
    for key in RESULT_METRICS:
        assert float(test_row[f"test/{key}"]) == results["test"][key], key
        assert float(last_row[f"test_last/{key}"]) == results["test_last"][key], key
    assert int(test_row["epoch"]) == int(last_row["epoch"]) == results["epochs"] == 4
    assert f"student cnn (SmallCNN), best on val (epoch {best})" in out.stdout
    for text in (out.stdout, (run_dir / "train.log").read_text()):
        assert f"selected epoch {best} of 4 (best val/acc, ties broken by lower val/nll, " \
               "then the later epoch): highest val/acc" in text


def test_result_files_respect_the_umask(ce_run):
    """Written atomically (via a private temporary file), yet readable like any other file."""
    _, run_dir, _ = ce_run
    for path in [run_dir / "results.json", run_dir / "config.yaml",
                 run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "best.ckpt"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_results_match_an_independent_evaluation_of_the_best_checkpoint(ce_run):
    _, run_dir, _ = ce_run
    results = json.loads((run_dir / "results.json").read_text())
    model = build_model("cnn", 10, (1, 8, 8))
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
    root, ce_dir, _ = ce_run
    ce = json.loads((ce_dir / "results.json").read_text())
    run_dir = root / "kd"
    out = cli("train", "method=kd", "teacher=cnn", f"teacher.ckpt={ce_dir}/checkpoints/last.ckpt",
              "trainer.max_epochs=2", "seed=3", f"hydra.run.dir={run_dir}", *FAST, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method"] == "kd"
    # the teacher row is the CE run's last-epoch weights evaluated on the same test set
    teacher = results["teachers"][0]
    assert (teacher["name"], teacher["arch"]) == ("cnn", "SmallCNN")
    assert teacher["test"]["acc"] == pytest.approx(ce["test_last"]["acc"], abs=1e-6)
    rows = list(csv.DictReader((run_dir / "logs" / "metrics.csv").open()))
    assert {"train/loss_ce", "train/loss_kd"} <= set(rows[0])
    # the summary names the config options: a cnn_small student under a cnn teacher
    assert "teacher cnn (SmallCNN)" in out.stdout
    assert "student cnn_small (SmallCNN)" in out.stdout
    assert results["student"]["name"] == "cnn_small"
    # a finished run directory is never overwritten
    again = cli("train", "method=ce", f"hydra.run.dir={run_dir}", *FAST, cwd=root)
    assert again.returncode == 1 and "already holds a finished run" in again.stderr
    assert json.loads((run_dir / "results.json").read_text()) == results


def test_auto_teacher_ignores_the_students_epochs_and_says_how_it_trains(tmp_path):
    """A 1-epoch student gets the dataset recipe's teacher (30 epochs), and the log says so."""
    # 2 batches an epoch (the teacher's too): the epochs are counted, not the accuracy
    out = cli("train", "trainer.max_epochs=1", "optimizer.weight_decay=0.01",
              "+trainer.limit_train_batches=2", f"hydra.run.dir={tmp_path / 'r'}", *FAST,
              cwd=tmp_path,
              env={"KDLAB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-3000:]
    (meta,) = (tmp_path / "cache" / "teachers").glob("*/meta.json")
    teacher_run = json.loads((Path(json.loads(meta.read_text())["run_dir"]) / "results.json")
                             .read_text())
    assert teacher_run["epochs"] == 30
    log = (tmp_path / "r" / "train.log").read_text()
    assert "training it with CE first: 30 epochs, SGD lr 0.05 (momentum 0.9, wd 0.0005), " \
           "cosine schedule, clean labels ->" in log
    assert str(tmp_path / "cache" / "teachers") in log


def test_help_lists_groups_and_methods(tmp_path):
    out = cli("train", "--help", cwd=tmp_path)
    for group in ("dataset:", "method:", "student:", "teacher:", "noise:", "trainer:", "logger:",
                  "optimizer:", "scheduler:"):
        assert group in out.stdout
    assert "resnet32x4" in out.stdout and "kdlab train" in out.stdout
    out = cli("methods", cwd=tmp_path)
    assert "  kd " in out.stdout and "  alm_kd " in out.stdout


def test_every_method_config_has_its_own_line(tmp_path):
    """kd/kd_ls, dkd/dkd_ls and nd/nd_dkd share a class; each line says which variant."""
    out = cli("methods", cwd=tmp_path)
    assert out.returncode == 0
    rows = [line.split(None, 1) for line in out.stdout.splitlines()[1:]]
    lines = dict(rows)
    configs = {p.stem for p in (conf_dir() / "method").glob("*.yaml")}
    assert set(lines) == configs and len(rows) == len(configs)
    assert len(set(lines.values())) == len(lines)  # no two configs described alike
    # the description starts at the same column on every line
    assert len({line.index(lines[name]) for line, (name, _) in
                zip(out.stdout.splitlines()[1:], rows, strict=True)}) == 1
    for plain, variant in (("kd", "kd_ls"), ("dkd", "dkd_ls")):
        assert "logit standardization" in lines[variant]
        assert "logit standardization" not in lines[plain]
    assert lines["nd"].startswith("KD++") and lines["nd_dkd"].startswith("DKD++")


def test_the_console_script_runs_and_fails_in_one_line(tmp_path):
    """The installed `kdlab` script in a fresh process: a bad value is one line, exit 1."""
    out = kdlab_process("train", "noise=symmetric", "noise.rate=2",
                        f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert out.returncode == 1 and out.error_lines == [
        "kdlab: error: noise.rate must be in [0, 1], got 2.0"]
    assert "Traceback" not in out.stderr and not (tmp_path / "r").exists()
