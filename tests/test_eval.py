"""`kdlab eval`: a trained student evaluated without training -- its run's own test numbers
on its own data, an independent evaluation on another split of the data, and one-line
errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import cli
from helpers.metrics import by_hand
from helpers.runs import FAST

from kdlab.data.digits import DigitsDataModule
from kdlab.models import build_model
from kdlab.models.loading import load_weights


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    run_dir = root / "run"
    out = cli("train", "method=ce", "student=cnn_small", "trainer.max_epochs=3", "seed=2",
              f"hydra.run.dir={run_dir}", *FAST, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run_dir


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_noisy")
    run_dir = root / "run"
    out = cli("train", "method=ce", "student=cnn_small", "trainer.max_epochs=2", "seed=3",
              "noise=symmetric", "noise.rate=0.4", f"hydra.run.dir={run_dir}", *FAST, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, run_dir


def test_a_run_evaluated_on_its_own_data_gives_its_results(run):
    root, run_dir = run
    results = json.loads((run_dir / "results.json").read_text())
    out = cli("eval", str(run_dir), cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = run_dir / "eval-digits"
    report = json.loads((folder / "eval.json").read_text())
    assert set(report["metrics"]) == set(results["test"])
    for key, value in results["test"].items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert report["reliability"]["count"] == results["reliability"]["count"]
    assert report["run_results_test"] == results["test"]
    assert (report["dataset"], report["split"], report["size"]) == ("digits", "test", 360)
    assert report["student"] == results["student"]
    assert (folder / "reliability.png").stat().st_size > 5000
    assert "this evaluation" in out.stdout and "the run's results.json (test)" in out.stdout
    assert "\nlabels: test split, clean labels (label noise only touches the train split)\n" \
        in out.stdout
    assert f"{results['test']['acc']:9.4f}" in out.stdout
    # the checkpoint's epoch, counted from 1 as in results.json
    assert report["epoch"] == results["best_epoch"]
    assert f"best.ckpt, epoch {results['best_epoch']}\n" in out.stdout
    # the last checkpoint: the run's test_last numbers, in a folder of its own
    last = cli("eval", str(run_dir), "checkpoint=last", cwd=root)
    assert last.returncode == 0, last.stderr[-3000:]
    report = json.loads((run_dir / "eval-digits-last" / "eval.json").read_text())
    for key, value in results["test_last"].items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert report["epoch"] == results["epochs"] == 3


def test_a_checkpoint_on_other_data_matches_an_independent_evaluation(run, tmp_path):
    root, run_dir = run
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    out = cli("eval", str(ckpt), "dataset.test_fraction=0.3", "dataset.split_seed=5",
              f"out={tmp_path / 'ev'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["run_results_test"] is None  # other data: nothing to compare with

    model = build_model("cnn_small", 10, (1, 8, 8))
    load_weights(model, str(ckpt))
    dm = DigitsDataModule(test_fraction=0.3, split_seed=5, seed=2)
    dm.setup()
    test = dm.splits["test"]
    with torch.no_grad():
        logits = model.eval()(test.inputs)
    expected = by_hand(logits, test.targets.numpy())
    assert report["size"] == len(test.targets) == 540
    assert report["metrics"]["acc"] == pytest.approx(expected["acc"], abs=1e-6)
    assert report["metrics"]["ece"] == pytest.approx(expected["ece"], abs=1e-5)
    assert report["metrics"]["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    assert report["metrics"]["brier"] == pytest.approx(expected["brier"], rel=1e-4)
    # noise=... changes the train split's labels, as in training: evaluated against them
    noisy = cli("eval", str(ckpt), "split=train", "noise=symmetric", "noise.rate=0.5",
                f"out={tmp_path / 'noisy'}", cwd=root)
    assert noisy.returncode == 0, noisy.stderr[-3000:]
    report = json.loads((tmp_path / "noisy" / "eval.json").read_text())
    dm = DigitsDataModule(seed=2, noise={"type": "symmetric", "rate": 0.5})
    dm.setup()
    train = dm.splits["train"]
    assert report["noise"]["realised_rate"] == pytest.approx(dm.realised_noise_rate)
    assert 0.4 < report["noise"]["realised_rate"] < 0.6
    with torch.no_grad():
        expected = by_hand(model(train.inputs), train.targets.numpy())
    assert report["size"] == len(train.targets)
    assert report["metrics"]["acc"] == pytest.approx(expected["acc"], abs=1e-6)
    assert report["metrics"]["ece"] == pytest.approx(expected["ece"], abs=1e-5)
    # the same checkpoint outside its run directory needs the data named
    alone = tmp_path / "best.ckpt"
    alone.write_bytes(ckpt.read_bytes())
    assert cli("eval", str(alone), cwd=root).returncode == 1
    named = cli("eval", str(alone), "dataset=digits", "split=val", cwd=root)
    assert named.returncode == 0, named.stderr[-3000:]
    assert (tmp_path / "eval-digits-val-best" / "eval.json").is_file()


def test_the_prediction_is_the_methods_as_in_the_run(tmp_path, monkeypatch):
    """mixup KD's prediction is s / std(s) (its ``predict``): kdlab eval measures that, as
    the run's test did, not the raw logits' calibration."""
    from kdlab.config import compose
    from kdlab.evaluate import evaluate
    from kdlab.pipeline import run as train

    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    results = train(compose([*FAST, "method=mixup_kd", "trainer.max_epochs=1",
                             "teacher.max_epochs=1"]), tmp_path / "r")
    report = evaluate(tmp_path / "r", [f"out={tmp_path / 'ev'}"])
    for key, value in results["test"].items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6), key
    model = build_model(results["student"]["name"], 10, (1, 8, 8))
    load_weights(model, results["checkpoints"]["best"])
    dm = DigitsDataModule(seed=0)
    dm.setup()
    test = dm.splits["test"]
    with torch.no_grad():
        s = model.eval()(test.inputs).double()
    standardised = by_hand(s / s.std(-1, keepdim=True), test.targets.numpy())
    raw = by_hand(s, test.targets.numpy())
    assert report["metrics"]["nll"] == pytest.approx(standardised["nll"], rel=1e-4)
    assert report["metrics"]["ece"] == pytest.approx(standardised["ece"], abs=1e-5)
    assert abs(raw["nll"] - standardised["nll"]) > 0.05  # the two differ: the test can fail


def test_a_noisy_runs_train_split_is_scored_on_the_labels_it_names(noisy_run):
    """split=train scores against the noisy labels the student trained on, and says so;
    labels=clean against the same examples' clean labels. Both checked by hand on the run's
    data rebuilt with and without the noise."""
    root, run_dir = noisy_run
    given = cli("eval", str(run_dir), "split=train", cwd=root)
    clean = cli("eval", str(run_dir), "split=train", "labels=clean", cwd=root)
    assert given.returncode == 0 and clean.returncode == 0, given.stderr + clean.stderr
    noisy_dm = DigitsDataModule(seed=3, noise={"type": "symmetric", "rate": 0.4})
    clean_dm = DigitsDataModule(seed=3)  # the same split, labels untouched
    noisy_dm.setup()
    clean_dm.setup()
    inputs = clean_dm.splits["train"].inputs
    assert torch.equal(noisy_dm.splits["train"].inputs, inputs)
    noisy_labels, clean_labels = noisy_dm.splits["train"].targets, clean_dm.splits["train"].targets
    assert (noisy_labels != clean_labels).float().mean() > 0.3
    model = build_model("cnn_small", 10, (1, 8, 8))
    load_weights(model, str(run_dir / "checkpoints" / "best.ckpt"))
    with torch.no_grad():
        logits = model.eval()(inputs)
    rate = noisy_dm.realised_noise_rate
    for out, folder, labels, kind, line in (
            (given, "eval-digits-train", noisy_labels, "given",
             f"labels: train split with symmetric 0.4 noise (realised rate {rate:.3f}): the "
             "labels the student trained on; labels=clean scores against the clean ones"),
            (clean, "eval-digits-train-clean", clean_labels, "clean",
             "labels: train split, clean labels: those before the symmetric 0.4 noise the "
             f"student trained on (realised rate {rate:.3f})")):
        assert f"\n{line}\n" in out.stdout, out.stdout
        report = json.loads((run_dir / folder / "eval.json").read_text())
        assert report["labels"] == {"kind": kind, "description": line[len("labels: "):]}
        expected = by_hand(logits, labels.numpy())
        assert report["metrics"]["acc"] == pytest.approx(expected["acc"], abs=1e-6), kind
        assert report["metrics"]["ece"] == pytest.approx(expected["ece"], abs=1e-5), kind
        assert report["metrics"]["nll"] == pytest.approx(expected["nll"], rel=1e-4), kind
    # other noise than the run's: still named, no longer "the labels the student trained on"
    other = cli("eval", str(run_dir), "split=train", "noise.rate=0.2", "out=other", cwd=root)
    assert "\nlabels: train split with symmetric 0.2 noise (realised rate " in other.stdout
    assert "trained on" not in other.stdout


@pytest.mark.parametrize("args,message", [
    (["{missing}"], "no such run directory or checkpoint: {missing}"),
    (["{root}"], "{root} has no checkpoints/best.ckpt; is it a kdlab run directory?"),
    (["{text}", "dataset=digits"], "cannot read checkpoint {text}: "),
    (["{state_dict}", "dataset=digits"], "{state_dict} is not a kdlab checkpoint"),
    (["{run}", "dataset=synthetic"], "the student predicts 10 classes but dataset synthetic "
                                     "has 20; evaluate it on a 10-class dataset"),
    (["{run}", "dataset=nope"], "unknown dataset 'nope'; available: "),
    (["{run}", "datset=cifar10"], "unknown key datset; did you mean dataset?"),
    (["{run}", "dataset.batchsize=8"], "unknown key dataset.batchsize; did you mean "
                                       "dataset.batch_size?"),
    (["{run}", "split=holdout"], "split must be one of test, val, meta, train, got 'holdout'"),
    (["{run}", "split=train", "labels=noisy"], "labels must be given (the split's own, noisy "
                                               "on a noisy train split) or clean, got 'noisy'"),
    (["{run}/checkpoints/best.ckpt"], None),  # in its run directory: fine
])
def test_errors_are_one_line(run, tmp_path, args, message):
    root, run_dir = run
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save(build_model("cnn_small", 10, (1, 8, 8)).state_dict(), tmp_path / "weights.pt")
    names = {"missing": tmp_path / "nope", "root": tmp_path, "text": tmp_path / "notes.txt",
             "state_dict": tmp_path / "weights.pt", "run": run_dir}
    args = [a.format(**names) for a in args]
    before = sorted(p.name for p in run_dir.iterdir())
    out = cli("eval", *args, f"out={tmp_path / 'out'}", cwd=root)
    if message is None:
        assert out.returncode == 0, out.stderr[-3000:]
        return
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("kdlab eval: error: " + message.format(**names)), out.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_usage_names_the_commands(tmp_path):
    top = cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and top.stdout.startswith("usage: kdlab COMMAND")
    for line in ("kdlab train [OVERRIDES...]", "kdlab eval RUN_DIR_OR_CKPT [key=value ...]",
                 "[--html]", "kdlab methods", "scripts/reproduce_cifar100.py --dry-run"):
        assert line in top.stdout
    usage = cli("eval", "--help", cwd=tmp_path)
    assert usage.returncode == 0 and "split=test          test | val | meta | train" in \
        usage.stdout
    bare = cli("eval", cwd=tmp_path)
    assert bare.returncode == 2 and bare.stderr.startswith("usage: kdlab eval")
    unknown = cli("evaluate", cwd=tmp_path)
    assert unknown.returncode == 2 and "commands: train, eval, report, methods" in unknown.stderr


def test_the_data_is_the_runs_own_unless_named(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from kdlab.config import compose
    from kdlab.evaluate import data_config

    monkeypatch.setenv("KDLAB_DATA_DIR", str(tmp_path / "data"))
    run_cfg = OmegaConf.create(OmegaConf.to_container(
        compose(["dataset=cifar100", "dataset.val_fraction=0.2", "seed=3"]), resolve=True))
    own = data_config(run_cfg, [])
    assert own.dataset == run_cfg.dataset and own.seed == 3
    moved = data_config(run_cfg, ["paths.data_dir=/elsewhere"])
    assert moved.dataset.root == "/elsewhere/cifar100" and moved.dataset.val_fraction == 0.2
    other = data_config(run_cfg, ["dataset=cifar10", "dataset.batch_size=7", "seed=1"])
    assert other.dataset._target_.endswith("Cifar10DataModule")
    assert (other.dataset.val_fraction, other.dataset.batch_size, other.seed) == (0.1, 7, 1)
    assert other.choices.dataset == "cifar10"
    noisy = data_config(run_cfg, ["noise=pairflip", "noise.rate=0.3"])
    assert (noisy.noise.type, noisy.noise.rate, noisy.dataset) == ("pairflip", 0.3,
                                                                   run_cfg.dataset)
