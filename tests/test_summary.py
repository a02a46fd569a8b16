"""The table a finished run prints (kdlab/summary.py): its layout, character for character,
and that training needs no pandas (a run in a process where pandas cannot be imported)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from kdlab.summary import run_summary

RESULTS = {
    "method": "kd", "dataset": "digits", "seed": 3, "wall_time_s": 12.6, "epochs": 9,
    "noise": {"type": "symmetric", "rate": 0.4}, "best_epoch": 7,
    "student": {"name": "cnn_small", "arch": "SmallCNN"},
    "teachers": [{"name": "cnn", "arch": "SmallCNN",
                  "test": {"acc": 0.9028, "ece": 0.0375, "nll": 0.3012}}],
    "test": {"acc": 0.8611, "ece": math.nan, "nll": 12.25},
    "test_last": {"acc": 0.85, "ece": 0.0712, "nll": 0.44449},
    "selection": {"epoch": 7, "rule": "best val/acc", "reason": "highest val/acc 0.9, no tie"},
}


def test_the_summary_table_layout():
    # names left-aligned; numbers to 4 decimals, right-aligned in their column, under headers
    # that start one space in; columns one space apart (the layout pandas printed before)
    assert run_summary(RESULTS, Path("/runs/x")).split("\n") == [
        "",
        "kdlab: method=kd dataset=digits seed=3 noise=symmetric:0.4 (13 s)",
        "test set                                             acc    ECE    NLL   ",
        "teacher cnn (SmallCNN)                              0.9028 0.0375  0.3012",
        "student cnn_small (SmallCNN), best on val (epoch 7) 0.8611    NaN 12.2500",
        "student cnn_small, last epoch                       0.8500 0.0712  0.4445",
        "selected epoch 7 of 9 (best val/acc): highest val/acc 0.9, no tie",
        "run directory: /runs/x",
    ]
    short = {**RESULTS, "teachers": [], "selection": None,
             "student": {"name": "s", "arch": "m"}, "test": RESULTS["test_last"]}
    table = run_summary(short, Path("r")).split("\n")[2:5]
    assert table == ["test set                              acc    ECE    NLL  ",
                     "student s (m), best on val (epoch 7) 0.8500 0.0712 0.4445",
                     "student s, last epoch                0.8500 0.0712 0.4445"]


def test_a_run_needs_no_pandas(tmp_path):
    """kdlab train in a fresh process where ``import pandas`` fails (a stand-in package first
    on the path raises ImportError; scikit-learn, which the data modules use, then does
    without it): the run finishes and prints its summary, and pandas was never loaded."""
    blocked = tmp_path / "blocked" / "pandas"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text("raise ImportError('pandas is blocked here')\n")
    run_dir = tmp_path / "run"
    script = ("import sys\n"
              "from kdlab.cli import main\n"
              f"sys.argv = ['kdlab', 'train', 'method=ce', 'trainer=cpu', "
              f"'trainer.max_epochs=1', 'trainer.enable_progress_bar=false', 'num_threads=1', "
              f"'hydra.run.dir={run_dir}']\n"
              "main()\n"
              "assert 'pandas' not in sys.modules\n")
    env = {**os.environ, "PYTHONPATH": str(blocked.parent)}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    # the longest name is "student cnn_small (SmallCNN), best on val (epoch 1)": 22 more
    assert f"student cnn_small, last epoch{' ' * 23}{results['test_last']['acc']:.4f}" \
        in out.stdout
    assert f"run directory: {run_dir}" in out.stdout
