"""DistillModule: the training step, its checks, and checkpoints that load on their own."""

from __future__ import annotations

import pytest
import torch

from kdlab.config import compose
from kdlab.errors import NonFiniteLossError
from kdlab.models import build_model
from kdlab.models.loading import freeze
from kdlab.module import DistillModule
from kdlab.pipeline import run
from kdlab.teachers import Teachers, forward_with_features

OPTIMIZER = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}


def make_module(method=None):
    torch.manual_seed(0)
    teacher = freeze(build_model("cnn", 10, (1, 8, 8), width=8))
    module = DistillModule({"_target_": "kdlab.models.small.cnn", "width": 4},
                           method or {"_target_": "kdlab.methods.kd.KD"}, 10, (1, 8, 8),
                           OPTIMIZER, None, teachers=Teachers([teacher]))
    module.log = lambda *a, **k: None
    return module, teacher


def test_teachers_are_not_submodules_and_not_in_checkpoints():
    module, teacher = make_module()
    teacher_keys = set(teacher.state_dict())
    assert not any(k.split(".", 1)[-1] in teacher_keys and not k.startswith("student.")
                   for k in module.state_dict())
    assert all(p is not q for p in module.parameters() for q in teacher.parameters())


def test_non_finite_loss_names_step_and_term():
    module, _ = make_module()
    module._check_finite(torch.tensor([1.0, 2.0]), ["ce", "kd"])  # finite: nothing happens
    with pytest.raises(NonFiniteLossError, match=r"'kd' became nan at step 0"):
        module._check_finite(torch.tensor([1.0, float("nan")]), ["ce", "kd"])


def test_student_is_kept_channels_last_with_the_same_outputs():
    module, _ = make_module()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = module.student(x)
    module.setup("fit")
    convs = [m.weight for m in module.student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with torch.no_grad():
        after = module(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_loads_on_its_own_with_load_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    results = run(compose(["trainer=cpu", "trainer.max_epochs=1", "num_threads=1",
                           "trainer.enable_progress_bar=false", "method=ce"]), tmp_path / "r")
    module = DistillModule.load_from_checkpoint(results["checkpoints"]["best"])
    assert module.hparams.student["_target_"] == "kdlab.models.small.cnn"
    assert module.hparams.student["width"] == 8 and module.num_classes == 10
    from kdlab.data.digits import DigitsDataModule

    dm = DigitsDataModule(seed=0)
    dm.setup()
    test = dm.splits["test"]
    with torch.no_grad():
        acc = (module.eval()(test.inputs).argmax(1) == test.targets).float().mean().item()
    assert acc == pytest.approx(results["test"]["acc"], abs=1e-6)


def test_the_training_loss_is_the_sum_of_the_methods_terms():
    module, teacher = make_module()
    batch = {"input": torch.randn(16, 1, 8, 8), "target": torch.randint(0, 10, (16,)),
             "index": torch.arange(16)}

    loss = module.training_step(batch, 0)  # no cache prepared: the teacher runs
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    terms = module.method(forward_with_features(module.student, batch["input"], ()),
                          module.context.teacher_outputs(batch["input"]), batch)
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)


def test_load_from_checkpoint_restores_method_parts_built_from_saved_shapes(tmp_path,
                                                                            monkeypatch):
    """TGeo-KD's controller is built in setup(); load_from_checkpoint rebuilds it from the
    checkpoint's shapes and restores its weights."""
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    results = run(compose(["trainer=cpu", "trainer.max_epochs=1", "num_threads=1",
                           "trainer.enable_progress_bar=false", "method=tgeo_kd",
                           "teacher.max_epochs=1"]), tmp_path / "r")
    path = results["checkpoints"]["best"]
    saved = torch.load(path, weights_only=True, map_location="cpu")["state_dict"]
    module = DistillModule.load_from_checkpoint(path)
    restored = module.state_dict()
    controller = [k for k in saved if k.startswith("method.controller.")]
    assert controller
    for key in controller:
        assert torch.equal(restored[key], saved[key]), key
