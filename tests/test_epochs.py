"""One epoch count everywhere a user reads it: from 1 ("epoch 1" is the first), while
Lightning's counter (from 0) stays inside (checkpoints' ``epoch`` field). The log line,
summary, results.json and metrics.csv are checked on real runs in tests/test_cli.py, wandb
and TensorBoard in tests/test_loggers.py, ALM-KD's passes in tests/methods/test_alm_kd.py,
kdlab eval in tests/test_eval.py; here: the progress bar and the resumed metrics log."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import torch
from helpers.runs import FAST

from kdlab.callbacks import EpochProgressBar
from kdlab.config import compose
from kdlab.run_dir import RunDir
from kdlab.trainer import build_trainer


def test_the_progress_bar_shows_the_epoch_from_1_of_all():
    bar = EpochProgressBar()
    trainer = SimpleNamespace(current_epoch=4, max_epochs=5, num_training_batches=17)
    bar._trainer = trainer
    bar.train_progress_bar = bar.init_train_tqdm()
    bar.on_train_epoch_start(trainer)
    assert bar.train_progress_bar.desc == "Epoch 5/5: "  # tqdm adds the ": "
    assert bar.train_progress_bar.total == 17
    bar.train_progress_bar.close()


def test_runs_with_a_progress_bar_get_it(tmp_path):
    shown = build_trainer(compose([*FAST, "trainer.enable_progress_bar=true"]), tmp_path, [])
    assert isinstance(shown.progress_bar_callback, EpochProgressBar)
    hidden = build_trainer(compose(FAST), tmp_path, [])
    assert hidden.progress_bar_callback is None
    # a progress bar of the user's own is kept
    own = build_trainer(compose([*FAST, "trainer.enable_progress_bar=true",
                                 "+callbacks.bar={_target_: pytorch_lightning.callbacks."
                                 "RichProgressBar}"]), tmp_path, [])
    assert type(own.progress_bar_callback).__name__ == "RichProgressBar"


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)


def test_a_resumed_log_keeps_the_epochs_its_checkpoint_completed(tmp_path):
    """Killed in epoch 3 after the checkpoint of epoch 2 (Lightning's epoch 1), or after the
    final tests: the rows of epochs 1-2 stay, those of epoch 3 and the tests go (the resumed
    run logs them again)."""
    run_dir = RunDir(tmp_path)
    log = tmp_path / "logs" / "metrics.csv"
    before = [{"epoch": 1, "step": 16, "val/acc": 0.5}, {"epoch": 2, "step": 33, "val/acc": 0.6},
              {"epoch": 3, "step": 40, "train/loss_step": 1.0},
              {"epoch": 2, "step": 34, "test_last/acc": 0.7},
              {"epoch": 2, "step": 34, "teacher0/test/acc": 0.9}]
    write_rows(log, before)
    torch.save({"epoch": 1}, tmp_path / "last.ckpt")
    run_dir._keep_metrics_for_resume()
    write_rows(log, [{"epoch": 3, "step": 50, "val/acc": 0.8}])  # what the resumed run logs
    run_dir.merge_resumed_metrics(str(tmp_path / "last.ckpt"))
    run_dir.write_results({})
    rows = list(csv.DictReader(log.open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "16"), ("2", "33"), ("3", "50")]
