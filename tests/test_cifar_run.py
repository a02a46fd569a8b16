"""The README's main command, `kdlab train method=alm_kd dataset=cifar100`, end to end against
a local CIFAR-100 server (a generated archive, tiny): the standard pair resnet8x4 <-
resnet32x4 on the dataset's recipe, the plan printed before training, the estimate after
the first epoch; then `kdlab eval` of that run. Plus the plan's other cases and the
estimate callback in-process."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from helpers.cifar import LocalServer, make_cifar100
from helpers.cli import cli

from kdlab.callbacks import RunEstimate
from kdlab.config import compose
from kdlab.plan import describe_plan

# Tiny data and one epoch; everything else is the command as a user types it.
TINY = ["trainer.max_epochs=1", "teacher.max_epochs=1", "dataset.batch_size=16",
        "+trainer.limit_train_batches=1", "trainer.enable_progress_bar=false", "num_threads=1"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar_run")
    served = root / "served"
    served.mkdir()
    md5, arrays = make_cifar100(served, n_train=60, n_test=10, n_classes=4)
    server = LocalServer(served)
    env = {"KDLAB_CACHE_DIR": str(root / "cache"), "KDLAB_DATA_DIR": str(root / "data")}
    data = [f"+dataset.url={server.url('cifar-100-python.tar.gz')}", f"+dataset.md5={md5}"]
    run_dir = root / "run"
    try:
        out = cli("train", "method=alm_kd", "dataset=cifar100", *data, *TINY,
                  f"hydra.run.dir={run_dir}", cwd=root, env=env)
    finally:
        server.close()
    assert out.returncode == 0, out.stderr[-3000:]
    return SimpleNamespace(root=root, run_dir=run_dir, out=out, env=env, data=data,
                           requests=list(server.requests), arrays=arrays)


def test_alm_kd_on_cifar100_runs_the_standard_pair_on_the_recipe(cifar):
    results = json.loads((cifar.run_dir / "results.json").read_text())
    assert cifar.requests == ["/cifar-100-python.tar.gz"]
    assert (results["method"], results["dataset"]) == ("alm_kd", "cifar100")
    assert (results["student"]["name"], results["student"]["arch"]) == ("resnet8x4",
                                                                        "CifarResNet")
    (teacher,) = results["teachers"]
    assert (teacher["name"], teacher["arch"]) == ("resnet32x4", "CifarResNet")
    assert results["split_sizes"]["test"] == len(cifar.arrays["test_y"])
    config = (cifar.run_dir / "config.yaml").read_text()
    # the dataset's recipe: SGD lr 0.05, momentum 0.9, wd 5e-4, x0.1 at 150/180/210
    for line in ("lr: 0.05", "momentum: 0.9", "weight_decay: 0.0005", "schedule: multistep",
                 "- 150", "- 180", "- 210"):
        assert line in config


def test_the_plan_comes_before_training_and_the_estimate_after_the_first_epoch(cifar):
    log = (cifar.run_dir / "train.log").read_text()
    plan = log.index("plan:")
    teacher = re.escape(str(cifar.root / "cache" / "teachers")) + r"/cifar100-resnet32x4-\w+"
    assert re.search(r"teacher resnet32x4: train with CE first: 1 epochs, SGD lr 0\.05 "
                     r"\(momentum 0\.9, wd 0\.0005\), multistep schedule, clean labels -> "
                     + teacher, log)
    student = ("student resnet8x4, method alm_kd: 1 epochs, SGD lr 0.05 (momentum 0.9, wd "
               "0.0005), multistep schedule (x0.1 at epochs 150, 180, 210), batch 16, on "
               "cifar100 (clean labels), seed 0")
    assert student in log
    # before the teacher trains, before the student trains; each run estimates once
    teacher_eta = log.index("ce / resnet32x4: epoch 1 took")
    student_eta = log.index("alm_kd / resnet8x4: epoch 1 took")
    assert plan < log.index("training it with CE first") < teacher_eta < student_eta
    assert log.count("alm_kd / resnet8x4: epoch 1 took") == 1
    assert re.search(r"alm_kd / resnet8x4: epoch 1 took [\d.]+ s \(training \+ validation\); "
                     r"estimated [\d.]+ s for all 1 epochs, 0\.0 s from now \(around "
                     r"\d\d:\d\d\)", log)
    assert "plan:" in cifar.out.stdout and "epoch 1 took" in cifar.out.stdout


def test_the_plan_says_reuse_load_or_no_teacher(cifar, monkeypatch):
    for key, value in cifar.env.items():
        monkeypatch.setenv(key, value)
    base = ["dataset=cifar100", *cifar.data, *TINY]
    again = describe_plan(compose(["method=alm_kd", *base]))
    assert "teacher resnet32x4: reuse the auto-trained teacher " in again
    assert str(cifar.root / "cache" / "teachers") in again and "teacher.pt" in again
    ckpt = cifar.run_dir / "checkpoints" / "last.ckpt"
    loaded = describe_plan(compose(["method=kd", *base, "teacher=resnet8x4",
                                    f"teacher.ckpt={ckpt}"]))
    assert f"teacher resnet8x4: load {ckpt}" in loaded
    alone = describe_plan(compose(["method=ce", *base, "scheduler=cosine", "optimizer=adam"]))
    assert "teacher: none (method ce does not use one)" in alone
    assert "Adam lr 0.001 (wd 0, betas [0.9, 0.999]), cosine schedule" in alone


def test_eval_of_the_cifar_run_gives_its_test_numbers(cifar):
    results = json.loads((cifar.run_dir / "results.json").read_text())
    out = cli("eval", str(cifar.run_dir), cwd=cifar.root, env=cifar.env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((cifar.run_dir / "eval-cifar100" / "eval.json").read_text())
    assert report["precision"] == results["precision"]
    for key, value in results["test"].items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert report["reliability"]["count"] == results["reliability"]["count"]
    # a 100-class student on a 10-class dataset: one line, before any download
    wrong = cli("eval", str(cifar.run_dir), "dataset=cifar10", cwd=cifar.root, env=cifar.env)
    assert wrong.returncode == 1
    assert wrong.stderr.strip() == ("kdlab eval: error: the student predicts 100 classes but "
                                    "dataset cifar10 has 10; evaluate it on a 100-class "
                                    "dataset")
    assert not (cifar.root / "data" / "cifar10").exists()


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_run_estimate_prints_once_on_rank_zero(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr("kdlab.callbacks.time.perf_counter", clock)
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=0, max_epochs=40)
    estimate = RunEstimate("kd / resnet8x4")
    with caplog.at_level("INFO", logger="kdlab"):
        estimate.on_train_epoch_start(trainer, None)
        clock.now += 150.0  # the first epoch: 150 s
        estimate.on_train_epoch_end(trainer, None)
        trainer.current_epoch = 1
        estimate.on_train_epoch_start(trainer, None)
        clock.now += 10.0
        estimate.on_train_epoch_end(trainer, None)
    lines = [r.getMessage() for r in caplog.records if "took" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith("kd / resnet8x4: epoch 1 took 2 min (training + validation); "
                               "estimated 1.7 h for all 40 epochs, 1.6 h from now (around ")
    # a resumed run (from epoch 30 of 40) estimates the epochs left; other ranks stay quiet
    resumed = RunEstimate("x")
    trainer = SimpleNamespace(is_global_zero=True, current_epoch=30, max_epochs=40)
    resumed.on_train_epoch_start(trainer, None)
    clock.now += 60.0
    resumed.on_train_epoch_end(trainer, None)
    assert "epoch 31 took 60 s" in resumed.reported and "9 min from now" in resumed.reported
    quiet = RunEstimate("x")
    rank1 = SimpleNamespace(is_global_zero=False, current_epoch=0, max_epochs=40)
    quiet.on_train_epoch_start(rank1, None)
    quiet.on_train_epoch_end(rank1, None)
    assert quiet.reported is None
