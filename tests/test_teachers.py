"""Teachers: loaded and frozen, and the teacher-logit cache (the runtime part of a run's
teachers; which teachers a config names and auto-training: test_teacher_config.py,
test_pipeline.py)."""

from __future__ import annotations

import torch

from kdlab import teachers as teachers_mod
from kdlab.config import compose
from kdlab.data.digits import DigitsDataModule
from kdlab.methods.kd import KD
from kdlab.models import build_model
from kdlab.models.loading import freeze
from kdlab.pipeline import run
from kdlab.teachers import Placement, Teachers

TINY = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
        "num_threads=1"]


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
    args = [*TINY, "trainer.max_epochs=2", "teacher.max_epochs=2", "seed=3"]
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
