"""Every method end to end through ``kdlab.train.run`` on digits (2 epochs), over two
student/teacher pairs (cnn_small <- cnn, mlp <- cnn), plus an in-process check for every
method that a training step's gradient reaches the student and never the teacher.

Teachers are trained once (auto, CE) into a cache shared by this module.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers.context import FakeContext

from kdlab.config import compose, instantiate_method
from kdlab.models import build_model
from kdlab.train import run

# Lightning's own deprecation noise (kdlab.train filters it outside pytest)
pytestmark = pytest.mark.filterwarnings("ignore:.*treespec")

COMMON = ["dataset=digits", "trainer=cpu", "trainer.max_epochs=2",
          "trainer.enable_progress_bar=false"]
CNN_PAIR = ["student=cnn_small", "teacher=cnn"]
MLP_PAIR = ["student=mlp", "teacher=cnn"]

# (id, overrides, the loss terms the method logs)
RUNS = [
    ("ce", ["method=ce", "student=mlp"], ["ce"]),
    ("kd", ["method=kd", *CNN_PAIR], ["ce", "kd"]),
    ("dkd", ["method=dkd", *MLP_PAIR], ["ce", "tckd", "nckd"]),
    ("pskd", ["method=pskd", "student=cnn_small"], ["soft_ce"]),
    ("pld", ["method=pld", *CNN_PAIR], ["pld"]),
    ("taid", ["method=taid", *MLP_PAIR], ["taid"]),
    ("fitnet-cnn", ["method=fitnet", *CNN_PAIR, "method.student_layer=features.5",
                    "method.teacher_layer=features.5"], ["ce", "hint"]),
    ("fitnet-mlp", ["method=fitnet", *MLP_PAIR, "method.student_layer=body.2",
                    "method.teacher_layer=features.5"], ["ce", "hint"]),
    ("multi_teacher_kd", ["method=multi_teacher_kd", "student=mlp",
                          "teachers=[{model: cnn}, {model: mlp, hidden: [64]}]"],
     ["ce", "kd"]),
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    # Shared with test_method_state.py in one session: teachers are trained once.
    path = tmp_path_factory.getbasetemp() / "kdlab_cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLAB_CACHE_DIR", str(path))
        yield path


@pytest.mark.parametrize("overrides,terms", [r[1:] for r in RUNS], ids=[r[0] for r in RUNS])
def test_method_runs_end_to_end(cache_dir, tmp_path, overrides, terms):
    cfg = compose([*COMMON, *overrides])
    results = run(cfg, tmp_path / "run")
    assert results["status"] == "finished"
    assert results["epochs"] == 2
    for split in ("test", "test_last", "val"):
        assert all(math.isfinite(v) for v in results[split].values()), split
    # two epochs of any method on digits beat chance (10 classes) on the test set
    assert results["test"]["acc"] > 0.2
    n_teachers = 0 if results["method"] in ("ce", "pskd") else (
        2 if results["method"] == "multi_teacher_kd" else 1)
    assert len(results["teachers"]) == n_teachers
    with open(tmp_path / "run" / "logs" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    for term in terms:  # every term is logged on its own
        assert f"train/loss_{term}" in columns
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("name", ["ce", "kd", "dkd", "pskd", "pld", "taid", "fitnet",
                                  "multi_teacher_kd"])
def test_training_step_gradient_reaches_only_the_student(name):
    """Through DistillModule's own forward passes: the teacher (left trainable on purpose)
    gets no gradient, the student and the method's learnable parts do."""
    from kdlab.teachers import forward_with_features

    overrides = [f"method={name}"]
    if name == "fitnet":
        overrides += ["method.student_layer=features.5", "method.teacher_layer=features.5"]
    method = instantiate_method(compose(overrides).method)
    torch.manual_seed(0)
    student = build_model("cnn", 10, (1, 8, 8), width=8)
    teacher = build_model("cnn", 10, (1, 8, 8), width=16).eval()
    ctx = FakeContext(student, (teacher,), current_epoch=1)
    method.setup(ctx)
    method.on_train_epoch_start(ctx)
    x = torch.randn(8, 1, 8, 8)
    batch = {"input": x, "target": torch.arange(8) % 10, "index": torch.arange(8)}
    teachers = ctx.teacher_outputs(x, method.teacher_features) if method.needs_teacher else []
    terms = method(forward_with_features(student, x, method.student_features), teachers, batch)
    loss = torch.stack(list(terms.values())).sum()
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in method.extra_parameters())
