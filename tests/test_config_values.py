"""Every number of trainer.*, dataset.*, teacher.*, optimizer.* and selection.* that a user is
likely to touch, set to a value a run cannot use, through the `kdlab` command (in-process):
exit 1, one `kdlab: error:` line naming the key (and what is allowed), no run directory.
Before these checks some of these values crashed after training (max_epochs=0, a validation
cadence that skips the last epoch), never ended (max_epochs=-1) or failed at run time.
And several devices: accepted, with the strategy and the global batch in the plan."""

from __future__ import annotations

import re

import pytest
from helpers.cli import cli
from helpers.runs import FAST

from kdlab.config import compose
from kdlab.plan import describe_plan

# name: (overrides, words the one error line must contain)
CASES = {
    # trainer
    "no epochs": (["trainer.max_epochs=0"], ["trainer.max_epochs", ">= 1", "got 0"]),
    "endless epochs": (["trainer.max_epochs=-1"], ["trainer.max_epochs", ">= 1", "got -1"]),
    "fractional epochs": (["trainer.max_epochs=2.5"], ["trainer.max_epochs", "integer"]),
    "min epochs over max": (["trainer.max_epochs=2", "+trainer.min_epochs=3"],
                            ["trainer.min_epochs", "[0, 2]"]),
    "max steps": (["+trainer.max_steps=10"], ["trainer.max_steps", "trainer.max_epochs"]),
    "validation skips the last epoch": (
        ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=3"],
        ["check_val_every_n_epoch=3", "last", "divisor of 2: 1, 2"]),
    "validation skips the last of 10": (
        ["trainer.max_epochs=10", "trainer.check_val_every_n_epoch=4"],
        ["divisor of 10: 1, 2, 5, 10"]),
    "no validation cadence": (["trainer.check_val_every_n_epoch=0"],
                              ["trainer.check_val_every_n_epoch", ">= 1"]),
    "validation inside epochs": (["+trainer.val_check_interval=0.5"],
                                 ["trainer.val_check_interval", "1.0"]),
    "no training batches": (["+trainer.limit_train_batches=0"],
                            ["trainer.limit_train_batches", "train nothing"]),
    "no validation batches": (["+trainer.limit_val_batches=0"],
                              ["trainer.limit_val_batches", "model selection"]),
    "validation fraction over 1": (["+trainer.limit_val_batches=1.5"],
                                   ["trainer.limit_val_batches", "(0, 1]", "1.5"]),
    "no test batches": (["+trainer.limit_test_batches=0.0"], ["trainer.limit_test_batches"]),
    "sanity steps": (["+trainer.num_sanity_val_steps=-2"], ["trainer.num_sanity_val_steps"]),
    "log interval": (["trainer.log_every_n_steps=0"], ["trainer.log_every_n_steps", ">= 1"]),
    "gradient accumulation": (["+trainer.accumulate_grad_batches=0"],
                              ["trainer.accumulate_grad_batches", ">= 1"]),
    "negative clipping": (["trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val", ">= 0"]),
    "no devices": (["trainer.devices=0"], ["trainer.devices", "auto"]),
    "negative devices": (["trainer.devices=-2"], ["trainer.devices", "got -2"]),
    "no nodes": (["+trainer.num_nodes=0"], ["trainer.num_nodes", ">= 1"]),
    "fast dev run": (["+trainer.fast_dev_run=true"], ["trainer.fast_dev_run", "max_epochs=1"]),
    "no checkpoints": (["+trainer.enable_checkpointing=false"],
                       ["trainer.enable_checkpointing", "best.ckpt"]),
    # dataset
    "batch size 0": (["dataset.batch_size=0"], ["dataset.batch_size", ">= 1"]),
    "eval batch size": (["+dataset.eval_batch_size=-1"], ["dataset.eval_batch_size", ">= 1"]),
    "meta fraction 0": (["dataset.meta_fraction=0"], ["dataset.meta_fraction", "(0, 1)"]),
    "val fraction 1": (["dataset.val_fraction=1.0"], ["dataset.val_fraction", "[0, 1)"]),
    "test fraction 0": (["dataset.test_fraction=0"], ["dataset.test_fraction", "(0, 1)"]),
    "test fraction 1": (["dataset.test_fraction=1.0"], ["dataset.test_fraction", "(0, 1)"]),
    "workers": (["dataset.num_workers=-1"], ["dataset.num_workers", ">= 0"]),
    "split seed": (["dataset.split_seed=-3"], ["dataset.split_seed", ">= 0"]),
    "recipe epochs": (["dataset.recipe.max_epochs=0"], ["dataset.recipe.max_epochs", ">= 1"]),
    "recipe lr": (["dataset.recipe.lr=0"], ["dataset.recipe.lr", "> 0"]),
    "recipe momentum": (["dataset.recipe.momentum=1.0"], ["dataset.recipe.momentum", "[0, 1)"]),
    "recipe weight decay": (["dataset.recipe.weight_decay=-0.1"],
                            ["dataset.recipe.weight_decay", ">= 0"]),
    "recipe gamma": (["dataset.recipe.gamma=0"], ["dataset.recipe.gamma", "(0, 1]"]),
    "milestone 0": (["dataset.recipe.milestones=[0,10]"], ["dataset.recipe.milestones", "[1, 30]"]),
    "milestone after the end": (["dataset.recipe.milestones=[10,40]"],
                                ["dataset.recipe.milestones", "[1, 30]", "got 40"]),
    # teacher (auto-trained: its recipe overrides)
    "teacher epochs": (["teacher.max_epochs=0"], ["teacher.max_epochs", ">= 1"]),
    "teacher lr": (["teacher.lr=-0.1"], ["teacher.lr", "> 0"]),
    "teacher weight decay": (["teacher.weight_decay=-1"], ["teacher.weight_decay", ">= 0"]),
    "what the teacher's own run inherits": (
        ["trainer.max_epochs=10", "+trainer.min_epochs=5", "teacher.max_epochs=3"],
        ["auto-trained teacher (cnn", "trainer.min_epochs", "[0, 3]"]),
    # optimizer
    "lr 0": (["optimizer.lr=0"], ["optimizer.lr", "> 0"]),
    "negative lr": (["optimizer.lr=-0.01"], ["optimizer.lr", "> 0"]),
    "momentum": (["optimizer.momentum=-0.5"], ["optimizer.momentum", "[0, 1)"]),
    "weight decay": (["optimizer.weight_decay=-1"], ["optimizer.weight_decay", ">= 0"]),
    # selection
    "selection metric": (["selection.metric=test/acc"], ["selection.metric", "val/acc"]),
    "selection tie-break": (["selection.tie_break=[val/foo]"], ["'val/foo'", "last/first"]),
    "selection by a metric not logged": (
        ["dataset=synthetic", "dataset.n_classes=4", "selection.metric=val/acc_top5"],
        ["val/acc_top5", "4 classes", "val/nll"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_value_no_run_can_use_is_refused_before_anything_exists(case, tmp_path):
    overrides, words = CASES[case]
    run_dir = tmp_path / re.sub(r"[^a-z0-9]+", "_", case)
    out = cli("train", *FAST, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path,
              env={"KDLAB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(out.error_lines) == 1, out.stderr[-2000:]
    for word in words:
        assert word in out.error_lines[0], (word, out.error_lines[0])
    assert "Traceback" not in out.stderr + out.stdout
    assert not run_dir.exists() and not (tmp_path / "cache").exists()


def test_several_devices_are_stated_in_the_plan():
    """DDP (trainer=ddp, or devices > 1 with strategy auto) says what it does with the batch
    and the learning rate before anything runs."""
    ddp = describe_plan(compose(["trainer=ddp", "trainer.devices=2", "dataset.batch_size=32"]))
    assert "batch 32 per device" in ddp
    assert ("distributed: strategy ddp, one process per device; global batch 2 devices x 1 "
            "node(s) x 32 = 64; optimizer.lr 0.05 is used as given, not scaled with the global "
            "batch") in ddp
    auto = describe_plan(compose(["trainer.accelerator=cpu", "trainer.devices=2",
                                  "+trainer.num_nodes=2", "optimizer.lr=0.1"]))
    assert ("strategy ddp (Lightning's choice for strategy=auto), one process per device; "
            "global batch 2 devices x 2 node(s) x 64 = 256; optimizer.lr 0.1 is used as "
            "given") in auto
    single = describe_plan(compose(FAST))
    assert "distributed" not in single and "per device" not in single
