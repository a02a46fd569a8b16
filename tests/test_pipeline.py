"""kdlab.pipeline: runs made of runs above the one-run assembler -- validate, train the
missing teachers (each a run of its own, cached), run the generations (each a run distilled
from the previous best checkpoint), one run each time; a refused config creates nothing."""

from __future__ import annotations

import json

import pytest

from kdlab import pipeline, train
from kdlab.config import compose
from kdlab.errors import ConfigError, TeacherLoadError
from kdlab.pipeline import run
from kdlab.plan import describe_plan
from kdlab.teacher_config import teacher_specs
from kdlab.teachers import load_teachers

TINY = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
        "num_threads=1"]


class Calls(list):
    """("validate", method) and ("run", method, run dir, the teachers' weights) for each
    validation and each one-run call, in order; ``configs``: each one run's config."""

    def __init__(self):
        super().__init__()
        self.configs = {}


@pytest.fixture
def calls(monkeypatch):
    seen = Calls()
    real_validate, real_run = pipeline.validate, train.run

    def validate(cfg):
        seen.append(("validate", cfg.choices.method))
        real_validate(cfg)

    def one_run(cfg, run_dir, teacher_specs, ckpt_path=None):
        seen.append(("run", cfg.choices.method, run_dir.path, [s.weights for s in teacher_specs]))
        seen.configs[run_dir.path] = cfg
        return real_run(cfg, run_dir, teacher_specs, ckpt_path)

    monkeypatch.setattr(pipeline, "validate", validate)
    monkeypatch.setattr(train, "run", one_run)
    return seen


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(path))
    return path


def test_validate_then_the_teacher_then_each_generation_one_run(tmp_path, cache, calls):
    out = tmp_path / "r"
    cfg = compose([*TINY, "teacher=cnn_small", "teacher.max_epochs=1", "generations=2"])
    summary = run(cfg, out)
    (entry,) = (cache / "teachers").glob("digits-cnn_small-*")
    (teacher_dir,) = entry.glob("run-*")
    first, second = (json.loads((out / f"generation{k}" / "results.json").read_text())
                     for k in (1, 2))
    assert calls == [
        ("validate", "kd"),  # the chain
        ("validate", "kd"),  # generation 1 ...
        ("validate", "ce"),  # ... whose teacher is missing: its own run
        ("run", "ce", teacher_dir, []),
        ("run", "kd", out / "generation1", [str(entry / "teacher.pt")]),
        ("validate", "kd"),  # generation 2, distilled from generation 1's best checkpoint
        ("run", "kd", out / "generation2", [first["checkpoints"]["best"]]),
    ]
    assert [g["generation"] for g in summary["generations"]] == [1, 2]
    assert [g["test"] for g in summary["generations"]] == [first["test"], second["test"]]
    assert second["teachers"][0]["ckpt"] == first["checkpoints"]["best"]
    # generation 1's best student, tested as generation 2's teacher on the same test set
    assert second["teachers"][0]["test"]["acc"] == pytest.approx(first["test"]["acc"], abs=1e-6)
    assert summary["test"] == second["test"] and summary["teachers"] == first["teachers"]
    assert first["teachers"][0]["ckpt"] == "auto"
    # a stopped chain continues from its finished generations: nothing is trained again
    (out / "results.json").unlink()
    calls.clear()
    again = run(cfg, out)
    assert calls == [("validate", "kd")]
    assert again["generations"] == summary["generations"]


def test_a_refused_config_creates_nothing(tmp_path, cache, calls):
    for bad, why in ((["trainer.max_epochs=0"], "trainer.max_epochs must be an integer"),
                     (["teacher.max_epochs=0"], "teacher.max_epochs must be an integer")):
        with pytest.raises(ConfigError, match=why):
            run(compose([*TINY, *bad]), tmp_path / "r")
    assert calls == [("validate", "kd")] * 2
    assert not (tmp_path / "r").exists() and not cache.exists()
    # in a directory a launcher made (a sweep job's), the refusal is recorded, nothing else
    job = tmp_path / "job"
    job.mkdir()
    with pytest.raises(ConfigError):
        run(compose([*TINY, "trainer.max_epochs=0"]), job)
    assert [p.name for p in job.iterdir()] == ["failed.json"]
    assert "trainer.max_epochs" in json.loads((job / "failed.json").read_text())["error"]


def test_loading_teachers_never_trains_them(tmp_path, cache):
    (spec,) = teacher_specs(compose(TINY))
    assert spec.ckpt == "auto" and spec.weights is None
    with pytest.raises(TeacherLoadError, match="teacher .cnn. has no weights yet"):
        load_teachers([spec], 10, (1, 8, 8))
    assert not cache.exists()


def test_an_auto_teacher_is_trained_on_the_recipe_once_then_reused(tmp_path, cache, calls,
                                                                   caplog):
    # the student trains 1 epoch; the teacher gets its own 3-epoch recipe
    args = [*TINY, "seed=1", "teacher.max_epochs=3", "optimizer.lr=0.3",
            "optimizer.weight_decay=0.01", "scheduler=constant"]
    first = run(compose(args), tmp_path / "a")
    (entry_dir,) = (cache / "teachers").glob("digits-cnn-*")
    teacher_runs = [c for c in calls if c[:2] == ("run", "ce")]
    assert len(teacher_runs) == 1
    teacher_dir = teacher_runs[0][2]
    teacher_cfg = calls.configs[teacher_dir]
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
    calls.clear()
    second = run(compose(args), tmp_path / "b")
    assert f"teacher cnn: reuse {weights} {said}" in caplog.text
    assert calls == [("validate", "kd"), ("run", "kd", tmp_path / "b", [str(weights)])]
    assert weights.stat().st_mtime_ns == stamp
    assert second["teachers"][0]["test"] == first["teachers"][0]["test"]
    meta = json.loads((entry_dir / "meta.json").read_text())
    assert meta["test"]["acc"] == pytest.approx(first["teachers"][0]["test"]["acc"], abs=1e-6)
    assert meta["recipe"].startswith("3 epochs, SGD lr 0.05")
