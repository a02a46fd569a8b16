"""Teachers: auto-training on the dataset's recipe (once, cached, keyed), clean-label
teachers, and the teacher-logit cache."""

from __future__ import annotations

import json

import pytest
import torch

from kdlab import teachers as teachers_mod
from kdlab.config import compose
from kdlab.data.digits import DigitsDataModule
from kdlab.methods.kd import KD
from kdlab.models import build_model
from kdlab.models.loading import freeze
from kdlab.plan import describe_plan
from kdlab.teachers import (
    Placement,
    Teachers,
    teacher_specs,
    training_config,
    weights_cache_dir,
)
from kdlab.train import run

TINY = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
        "num_threads=1"]


def entry(overrides):
    cfg = compose(overrides)
    return weights_cache_dir(training_config(cfg, teacher_specs(cfg)[0]))


def test_auto_teacher_is_trained_on_the_recipe_once_then_reused(tmp_path, monkeypatch,
                                                                 caplog):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    trained = []
    real_run = run

    def counting_run(cfg, output_dir):
        trained.append((cfg, output_dir))
        return real_run(cfg, output_dir)

    monkeypatch.setattr("kdlab.train.run", counting_run)
    # the student trains 1 epoch; the teacher gets its own 3-epoch recipe
    args = [*TINY, "seed=1", "teacher.max_epochs=3", "optimizer.lr=0.3",
            "optimizer.weight_decay=0.01", "scheduler=constant"]
    first = real_run(compose(args), tmp_path / "a")
    (entry_dir,) = (tmp_path / "cache" / "teachers").glob("digits-cnn-*")
    assert len(trained) == 1
    teacher_cfg, teacher_dir = trained[0]
    assert teacher_cfg.trainer.max_epochs == 3 and teacher_cfg.optimizer.lr == 0.05
    assert teacher_cfg.optimizer.weight_decay == 5e-4 and teacher_cfg.scheduler.schedule == "cosine"
    teacher_results = json.loads((teacher_dir / "results.json").read_text())
    assert teacher_results["method"] == "ce" and teacher_results["epochs"] == 3
    assert teacher_results["student"]["name"] == "cnn"
    weights = entry_dir / "teacher.pt"
    stamp = weights.stat().st_mtime_ns
    # which of its epochs the students learn from: in meta.json, the plan and the log
    meta = json.loads((entry_dir / "meta.json").read_text())
    chosen = teacher_results["selection"]["epoch"]
    assert meta["selection"] == teacher_results["selection"] and meta["epochs"] == 3
    assert teacher_results["best_epoch"] == chosen and 1 <= chosen <= 3
    said = (f"(epoch {chosen} of 3, best val/acc, ties broken by lower val/nll, then the later "
            "epoch; CE: 3 epochs, SGD lr 0.05")
    assert f"reuse the auto-trained teacher {weights} {said}" in describe_plan(compose(args))
    caplog.set_level("INFO", logger="kdlab")
    second = real_run(compose(args), tmp_path / "b")
    assert f"teacher cnn: reuse {weights} {said}" in caplog.text
    assert len(trained) == 1 and weights.stat().st_mtime_ns == stamp
    assert second["teachers"][0]["test"] == first["teachers"][0]["test"]
    meta = json.loads((entry_dir / "meta.json").read_text())
    assert meta["test"]["acc"] == pytest.approx(first["teachers"][0]["test"]["acc"], abs=1e-6)
    assert meta["recipe"].startswith("3 epochs, SGD lr 0.05")


def test_cache_key_follows_the_teacher_not_the_student():
    key = entry([])
    assert key == entry([])
    for override in ["seed=1", "noise=symmetric", "teacher=cnn_small", "teacher.lr=0.1",
                     "teacher.max_epochs=3", "teacher.weight_decay=0",
                     "dataset.meta_fraction=0.2",
                     "dataset.recipe.lr=0.1",
                     # which epoch is kept: another rule is another teacher
                     "selection.tie_break=[first]", "selection.metric=val/nll",
                     "selection.mode=min",
                     # which batches it learns from
                     "+trainer.limit_train_batches=0.5"]:
        assert entry([override]) != key, override
    # the same rule, spelt out
    assert entry(["selection.mode=max", "selection.tie_break=[val/acc,val/nll,last]"]) == key
    noisy = ["noise=symmetric", "noise.rate=0.4"]
    assert entry([*noisy, "teacher.label_noise=none"]) != entry(noisy)
    # on clean data both are the same teacher
    assert entry(["teacher.label_noise=none"]) == key
    # the student's epochs, optimiser, schedule, the method and how data is read do not
    assert entry(["dataset.num_workers=2", "method=ce", "optimizer.lr=0.3", "student=mlp",
                  "trainer.max_epochs=3", "optimizer.weight_decay=0.1",
                  "scheduler=multistep"]) == key


def test_clean_label_teacher_trains_on_the_clean_labels_of_the_same_split():
    noisy = ["noise=symmetric", "noise.rate=0.4"]
    cfg = compose([*noisy, "teacher.label_noise=none"])
    teacher_cfg = training_config(cfg, teacher_specs(cfg)[0])
    assert teacher_cfg.noise.type == "none"
    assert teacher_cfg.dataset == cfg.dataset and teacher_cfg.seed == cfg.seed
    student_dm = DigitsDataModule(noise=dict(cfg.noise), seed=0)
    teacher_dm = DigitsDataModule(noise=dict(teacher_cfg.noise), seed=0)
    student_dm.setup()
    teacher_dm.setup()
    s, t = student_dm.splits["train"], teacher_dm.splits["train"]
    assert torch.equal(s.inputs, t.inputs)  # the same examples ...
    assert torch.equal(t.targets, s.clean_targets)  # ... with their clean labels
    assert (s.targets != t.targets).float().mean() > 0.3
    same = training_config(compose(noisy), teacher_specs(compose(noisy))[0])
    assert same.noise.type == "symmetric"


def test_a_teachers_list_takes_model_names_and_options():
    cfg = compose(["method=multi_teacher_kd",
                   "teachers=[{model: cnn, ckpt: auto}, {model: mlp, hidden: [16], lr: 0.1}]"])
    a, b = teacher_specs(cfg)
    assert (a.name, b.name) == ("cnn", "mlp")
    assert a.arch._target_.endswith("small.cnn") and a.arch.width == 32
    assert list(b.arch.hidden) == [16] and b.options["lr"] == 0.1
    assert training_config(cfg, b).dataset.recipe.lr == 0.1


def test_a_teachers_list_inherits_how_teacher_is_trained_unless_an_entry_says():
    cfg = compose(["method=multi_teacher_kd", "noise=symmetric", "noise.rate=0.4",
                   "teacher.label_noise=none", "teacher.max_epochs=3",
                   "teachers=[{model: cnn}, {model: mlp, label_noise: same, max_epochs: 5}]"])
    a, b = teacher_specs(cfg)
    assert (training_config(cfg, a).noise.type, training_config(cfg, a).trainer.max_epochs) == (
        "none", 3)
    assert (training_config(cfg, b).noise.type, training_config(cfg, b).trainer.max_epochs) == (
        "symmetric", 5)
    assert "ckpt" not in a.options and a.ckpt == "auto"  # where to get it is never inherited


def frozen_teacher(width=8):
    torch.manual_seed(0)
    return freeze(build_model("cnn", 10, (1, 8, 8), width=width))


def train_batches(dm, size=100):
    x = dm.splits["train"].inputs
    return [{"input": x[pos], "index": pos} for pos in torch.arange(len(x)).split(size)]


class BatchTransformKD(KD):
    """KD with a batch transform (as mixup has): training batches are no longer stored
    examples."""

    def transform_batch(self, batch, ctx):
        return batch


def augmented_digits():
    """Digits whose training batches count as augmented (random inputs per epoch)."""
    dm = DigitsDataModule(seed=0)
    dm.setup()
    dm.deterministic_train = False
    return dm


def test_logit_cache_holds_every_teachers_logits_and_stands_in_only_when_it_may():
    dm = DigitsDataModule(seed=0)
    dm.setup()
    teacher = frozen_teacher()
    teachers = Teachers([teacher])
    teachers.prepare(dm, KD(), epochs=1, placement=Placement())  # built now: batches read it
    with torch.no_grad():
        expected = teacher(dm.splits["train"].inputs)
    idx = torch.tensor([5, 0, 7])
    x = torch.randn(3, 1, 8, 8)  # not the stored examples: shows which path answered
    looked_up = teachers.for_training_batch({"input": x, "index": idx})
    torch.testing.assert_close(looked_up[0].logits, expected[idx], atol=1e-5, rtol=0)
    with torch.no_grad():
        fresh = teacher(x)
    # a method that needs features runs the teacher
    with_features = teachers.for_training_batch({"input": x, "index": idx}, ("features.2",))
    torch.testing.assert_close(with_features[0].logits, fresh)
    assert with_features[0].features["features.2"].shape[0] == 3
    # so do augmented batches and transformed batches, even once the cache exists (built by a
    # method's clean pass)
    for data, method in ((augmented_digits(), KD()), (dm, BatchTransformKD())):
        other = Teachers([teacher])
        other.prepare(data, method, epochs=1, placement=Placement())
        clean = other.for_train_examples({"input": x, "index": idx})  # builds it
        torch.testing.assert_close(clean[0].logits, expected[idx], atol=1e-5, rtol=0)
        computed = other.for_training_batch({"input": x, "index": idx})
        torch.testing.assert_close(computed[0].logits, fresh)


def test_augmented_training_builds_the_cache_on_first_clean_pass_only(monkeypatch):
    dm = augmented_digits()
    teachers = Teachers([frozen_teacher()])
    built = []
    build = teachers.build_cache
    monkeypatch.setattr(teachers, "build_cache", lambda *a, **k: built.append(1) or build(*a, **k))
    teachers.prepare(dm, KD(), epochs=1, placement=Placement())
    assert built == []  # augmented batches never read it: not built before training
    idx = torch.tensor([3, 1])
    batch = {"input": dm.splits["train"].inputs[idx], "index": idx}
    first = teachers.for_train_examples(batch)
    second = teachers.for_train_examples(batch)
    assert built == [1]
    torch.testing.assert_close(first[0].logits, second[0].logits)
    off = Teachers([frozen_teacher()], cache_mode="off")
    off.prepare(dm, KD(), epochs=1, placement=Placement())
    assert off._logits is None and off.views is None
    torch.testing.assert_close(off.for_train_examples(batch)[0].logits, first[0].logits,
                               atol=1e-5, rtol=0)
    assert off._logits is None


def test_the_cache_progress_bar_counts_examples_and_ends_its_line(capsys):
    """As the module builds it: from a generator of batches (no length). The bar counts
    examples against the train split's size and ends as one finished line."""
    dm = DigitsDataModule(seed=0)
    dm.setup()
    n = dm.train_size
    teachers = Teachers([frozen_teacher()])
    teachers.build_cache((b for b in train_batches(dm, size=256)), n, 10, "cpu",
                         key=lambda: b"", save=False, show_progress=True)
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1
    final = err.rstrip("\n").split("\r")[-1]
    assert final.startswith("teacher logits (train split, once): 100%")
    assert f" {n}/{n} [" in final and "example/s" in final
    assert "0batch" not in err and "batch" not in final


def test_the_cache_is_too_big_for_auto_but_memory_forces_it(monkeypatch):
    monkeypatch.setattr(teachers_mod, "LOGIT_CACHE_AUTO_BYTES", 1000)
    assert not Teachers([frozen_teacher()]).plan_cache(1000, 10, True, False)
    assert Teachers([frozen_teacher()], cache_mode="memory").plan_cache(1000, 10, True, False)


def test_teacher_cache_gives_the_same_run_and_disk_survives_a_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    args = [*TINY, "trainer.max_epochs=2", "seed=3"]
    plain = run(compose([*args, "teacher_cache=off"]), tmp_path / "off")
    first = run(compose([*args, "teacher_cache=disk"]), tmp_path / "d1")
    assert first["test"] == plain["test"] and first["val"] == plain["val"]
    (saved,) = (tmp_path / "cache" / "teacher_logits").glob("*.pt")
    second = run(compose([*args, "method=alm_kd", "teacher_cache=disk"]), tmp_path / "d2")
    assert not first["throughput"]["teacher_cache_loaded"]
    assert second["throughput"]["teacher_cache_loaded"]  # another method, same teacher + data
    saved.write_bytes(saved.read_bytes()[:100])  # truncated: ignored, recomputed, rewritten
    third = run(compose([*args, "teacher_cache=disk"]), tmp_path / "d3")
    assert not third["throughput"]["teacher_cache_loaded"]
    assert third["test"] == plain["test"]
    assert len(torch.load(saved, weights_only=True)) == 1
