"""Every method config in conf/method, end to end through ``kdlab.train.run`` for one epoch
on the digits and the synthetic defaults (each dataset's own pair), plus an in-process check
for every method that a training step's gradient reaches the student and never the teacher.

A new method joins both tests by its YAML alone. Teachers are trained (one epoch, auto, CE)
once into a cache shared by this module. Where a method cannot apply to a dataset's default
pair (attention maps and ReviewKD's fused feature maps need (B, C, H, W) features, which the
MLPs of `synthetic` do not have), the run must fail before any work with a one-line
ConfigError saying why: ``CANNOT_APPLY`` lists exactly those combinations.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers.context import FakeContext, digits_data

from kdlab.config import compose, conf_dir
from kdlab.errors import ConfigError
from kdlab.methods import instantiate_method
from kdlab.models import build_model
from kdlab.pipeline import run

METHODS = sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))
# one epoch of 3 batches (the teachers' too): every hook a fit calls, at a fraction of the cost
COMMON = ["trainer=cpu", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
          "trainer.enable_progress_bar=false", "teacher.max_epochs=1", "num_threads=1"]
# (method, dataset) pairs where the method cannot apply, and the reason its error gives
CANNOT_APPLY = {
    ("at", "synthetic"): "needs \\(B, C, H, W\\) feature maps.*MLP has no convolutional",
    ("reviewkd", "synthetic"): "needs \\(B, C, H, W\\) feature maps.*MLP has no convolutional",
    ("mlkd", "synthetic"): "needs image inputs",
}


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_on_every_offline_default(cache_dir, tmp_path, method, dataset):
    cfg = compose([*COMMON, f"dataset={dataset}", f"method={method}"])
    if (method, dataset) in CANNOT_APPLY:
        with pytest.raises(ConfigError, match=CANNOT_APPLY[method, dataset]) as info:
            run(cfg, tmp_path / "run")
        assert "\n" not in str(info.value) and not (tmp_path / "run").exists()
        return
    results = run(cfg, tmp_path / "run")
    assert results["status"] == "finished" and results["epochs"] == 1
    for split in ("test", "test_last", "val"):
        assert all(math.isfinite(v) for v in results[split].values()), split
    needs_teacher = instantiate_method(cfg.method).needs_teacher
    assert len(results["teachers"]) == (1 if needs_teacher else 0)
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    # every term the method returns is logged on its own
    names = set(one_step(method)[0])
    assert names and {f"train/loss_{k}" for k in names} <= set(columns)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def one_step(name: str):
    """One training step of method ``name`` on a digits-shaped cnn pair, after the hooks a fit
    runs first (setup, on_fit_start, on_train_epoch_start): (terms, method, student, teacher).
    """
    from kdlab.teachers import forward_with_features

    method = instantiate_method(compose([f"method={name}"]).method)
    torch.manual_seed(0)
    student = build_model("cnn", 10, (1, 8, 8), width=8)
    teacher = build_model("cnn", 10, (1, 8, 8), width=16).eval()
    method.check(student, [teacher] if method.needs_teacher else [])
    ctx = FakeContext(student, (teacher,), current_epoch=1, data=digits_data())
    method.setup(ctx)
    method.on_fit_start(ctx)
    method.on_train_epoch_start(ctx)
    x = torch.randn(8, 1, 8, 8)
    batch = {"input": x, "target": torch.arange(8) % 10, "index": torch.arange(8),
             **{f"input_{view}": torch.randn(8, 1, 8, 8) for view in method.input_views}}
    batch = method.transform_batch(batch, ctx)
    x = batch["input"]
    teachers = ctx.teacher_outputs(x, method.teacher_features) if method.needs_teacher else []
    terms = method(forward_with_features(student, x, method.student_features), teachers, batch)
    return terms, method, student, teacher


@pytest.mark.parametrize("name", METHODS)
def test_training_step_gradient_reaches_only_the_student(name):
    """Through DistillModule's own forward passes: the teacher (left trainable on purpose)
    gets no gradient, the student and the method's learnable parts do."""
    terms, method, student, teacher = one_step(name)
    loss = torch.stack(list(terms.values())).sum()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in method.extra_parameters())
