"""The assembler in-process: teacher cache, precision choice, the module's use of teachers."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.plugins.precision import Precision

from kdlab import train as train_mod
from kdlab.config import compose
from kdlab.errors import NonFiniteLossError
from kdlab.methods.kd import KD
from kdlab.models import build_model
from kdlab.models.loading import freeze
from kdlab.module import DistillModule, forward_with_features

TINY = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=1"]


def test_auto_teacher_is_trained_once_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    trained = []
    real_run = train_mod.run

    def counting_run(cfg, output_dir):
        if cfg.method._target_.endswith("CE"):
            trained.append(output_dir)
        return real_run(cfg, output_dir)

    monkeypatch.setattr(train_mod, "run", counting_run)
    cfg = compose([*TINY, "seed=1"])
    first = train_mod.run(cfg, tmp_path / "a")
    entries = list((tmp_path / "cache" / "teachers").glob("digits-cnn-*"))
    assert len(trained) == 1 and len(entries) == 1
    weights = entries[0] / "teacher.pt"
    stamp = weights.stat().st_mtime_ns
    second = train_mod.run(compose([*TINY, "seed=1"]), tmp_path / "b")
    assert len(trained) == 1 and weights.stat().st_mtime_ns == stamp
    assert second["teachers"][0]["test"] == first["teachers"][0]["test"]
    meta = json.loads((entries[0] / "meta.json").read_text())
    assert meta["test"]["acc"] == pytest.approx(first["teachers"][0]["test"]["acc"], abs=1e-6)
    # the teacher's own run is a normal CE run with its own results
    assert json.loads((trained[0] / "results.json").read_text())["method"] == "ce"


def _entry(overrides):
    cfg = compose(overrides)
    return train_mod.teacher_cache_dir(train_mod.teacher_training_config(cfg, cfg.teacher))


def test_cache_key_covers_what_determines_the_teacher():
    key = _entry([])
    assert key == _entry([])
    for override in ["seed=1", "noise=symmetric", "teacher.width=16", "teacher.lr=0.1",
                     "trainer.max_epochs=3", "dataset.meta_fraction=0.2",
                     "scheduler.name=multistep"]:
        assert _entry([override]) != key, override
    # how data is read, the method, or the student's own lr do not change the teacher
    assert _entry(["dataset.num_workers=2", "method=ce", "optimizer.lr=0.3",
                   "student=mlp"]) == key


def test_precision_auto(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert train_mod.resolve_precision("auto", "cpu") == "32-true"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert train_mod.resolve_precision("auto", "cpu") == "bf16-mixed"
    assert train_mod.resolve_precision("16-mixed", "cpu") == "16-mixed"


def _module():
    torch.manual_seed(0)
    student = build_model("cnn", 10, (1, 8, 8), width=4)
    teacher = freeze(build_model("cnn", 10, (1, 8, 8), width=8))
    opt = {"name": "sgd", "lr": 0.1}
    return DistillModule(student, KD(), [teacher], 10, opt, {"name": "none"}), teacher


def test_training_step_trains_the_student_only():
    module, teacher = _module()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = {"input": torch.randn(16, 1, 8, 8), "target": torch.randint(0, 10, (16,)),
             "index": torch.arange(16)}
    module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    loss.backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # teachers are not registered submodules: not optimised, not in checkpoints
    teacher_keys = set(teacher.state_dict())
    assert not any(k.split(".", 1)[-1] in teacher_keys and not k.startswith("student.")
                   for k in module.state_dict())
    # the loss is the sum of the terms the method returned
    terms = module.method(forward_with_features(module.student, batch["input"], ()),
                          module.teacher_outputs(batch["input"]), batch)
    assert loss.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)


def test_student_is_kept_channels_last_with_the_same_outputs():
    module, _ = _module()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        before = module.student(x)
    module._trainer = None
    module.setup("fit")
    convs = [m.weight for m in module.student.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    with torch.no_grad():
        after = module(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_names_step_and_term():
    module, _ = _module()
    with pytest.raises(NonFiniteLossError, match=r"'kd' became nan at step 0"):
        module._check_finite({"ce": torch.tensor(1.0), "kd": torch.tensor(float("nan"))})


def test_teacher_output_cache_gives_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    args = [*TINY, "trainer.max_epochs=2", "seed=2"]
    cached = train_mod.run(compose([*args, "teacher_cache=memory"]), tmp_path / "cached")
    plain = train_mod.run(compose([*args, "teacher_cache=off"]), tmp_path / "plain")
    assert cached["test"] == plain["test"] and cached["val"] == plain["val"]


def test_teacher_cache_on_disk_is_reused_and_survives_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    args = [*TINY, "seed=3"]
    plain = train_mod.run(compose([*args, "teacher_cache=off"]), tmp_path / "off")
    first = train_mod.run(compose([*args, "teacher_cache=disk"]), tmp_path / "d1")
    (saved,) = (tmp_path / "cache" / "teacher_logits").glob("digits-*.pt")
    second = train_mod.run(compose([*args, "method=alm_kd", "teacher_cache=disk"]),
                           tmp_path / "d2")
    assert not first["throughput"]["teacher_cache_loaded"]
    assert second["throughput"]["teacher_cache_loaded"]  # another method, same teacher + data
    assert first["test"] == plain["test"] and first["val"] == plain["val"]
    # other data (another seed's split) is another file
    train_mod.run(compose([*TINY, "seed=4", "teacher_cache=disk"]), tmp_path / "d3")
    assert len(list(saved.parent.glob("digits-*.pt"))) == 2
    saved.write_bytes(saved.read_bytes()[:100])  # truncated: ignored, recomputed, rewritten
    third = train_mod.run(compose([*args, "teacher_cache=disk"]), tmp_path / "d4")
    assert not third["throughput"]["teacher_cache_loaded"]
    assert third["test"] == plain["test"]
    assert len(torch.load(saved, weights_only=True)) == 1


class _FakeTrainer:
    """What the module's teacher cache reads from a Trainer (32-bit: no autocast)."""

    is_global_zero, progress_bar_callback = True, None

    def __init__(self, dm):
        self.datamodule, self.precision_plugin = dm, Precision()


def test_teacher_cache_holds_the_teachers_logits():
    from kdlab.data.digits import DigitsDataModule

    module, teacher = _module()
    dm = DigitsDataModule(seed=0)
    dm.setup()

    module._trainer = _FakeTrainer(dm)
    module._build_teacher_cache()
    (cache,) = module._train_teacher_logits
    with torch.no_grad():
        expected = teacher(dm.splits["train"].inputs)
    assert torch.allclose(cache, expected, atol=1e-5)
    batch = {"input": torch.zeros(3, 1, 8, 8), "index": torch.tensor([5, 0, 7])}
    assert torch.equal(module.teacher_outputs_for(batch)[0].logits, cache[[5, 0, 7]])


def test_augmented_training_keeps_the_cache_only_for_clean_train_passes():
    """With random augmentation the cache never stands in for a training batch's teacher
    forward, but a method that walks the un-augmented train split reads it."""
    from kdlab.data.digits import DigitsDataModule
    from kdlab.methods.alm_kd import ALMKD

    dm = DigitsDataModule(seed=0)
    dm.setup()
    dm.deterministic_train = False  # as if the train transform were random
    for method, kept in ((KD(), False), (ALMKD(), True)):
        module, teacher = _module()
        module.method = method
        module._trainer = _FakeTrainer(dm)
        module._build_teacher_cache()
        assert (module._train_teacher_logits is not None) == kept
        x = torch.randn(3, 1, 8, 8)  # an augmented view: not the stored example
        batch = {"input": x, "index": torch.tensor([5, 0, 7])}
        with torch.no_grad():
            fresh = teacher(x)
        assert torch.allclose(module.teacher_outputs_for(batch)[0].logits, fresh, atol=1e-6)
        clean = module.clean_train_teacher_outputs(batch)[0].logits
        if kept:
            with torch.no_grad():
                expected = teacher(dm.splits["train"].inputs[[5, 0, 7]])
            assert torch.allclose(clean, expected, atol=1e-5)
        else:
            assert torch.allclose(clean, fresh, atol=1e-6)
