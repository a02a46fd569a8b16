"""generations=N: each generation's config and the chain's results.json (the chain run end
to end, in order, and continued: test_pipeline.py)."""

from __future__ import annotations

from omegaconf import OmegaConf

from kdlab.config import compose
from kdlab.generations import chain_summary, generation_config, next_teacher
from kdlab.teacher_config import teacher_specs


def test_each_generation_is_one_run_distilled_from_its_teacher():
    cfg = compose(["generations=3", "method=multi_teacher_kd", "student=mlp",
                   "teachers=[{model: cnn}, {model: mlp}]"])
    student_ckpt = OmegaConf.create({"_target_": "kdlab.models.small.mlp", "ckpt": "g1.ckpt"})
    first = generation_config(cfg, 1, cfg.teacher)
    later = generation_config(cfg, 2, student_ckpt)
    for gen in (first, later):
        assert gen.generations == 1 and gen.teachers is None  # one teacher: `teacher`
        assert gen.student == cfg.student and gen.method == cfg.method and gen.seed == cfg.seed
    assert first.teacher == cfg.teacher and first.choices.teacher == "cnn"
    assert later.teacher == student_ckpt and later.choices.teacher == "mlp"
    (spec,) = teacher_specs(later)
    assert (spec.name, spec.ckpt, spec.weights) == ("mlp", "g1.ckpt", "g1.ckpt")
    # the chain's own config is left as it was
    assert cfg.generations == 3 and len(cfg.teachers) == 2 and cfg.choices.teacher == "cnn"


def test_the_next_teacher_is_the_student_architecture_at_its_best_checkpoint():
    cfg = compose(["student=mlp", "student.hidden=[16]"])
    teacher = next_teacher(cfg, {"checkpoints": {"best": "/runs/g1/best.ckpt", "last": "x"}})
    assert OmegaConf.to_container(teacher) == {"_target_": "kdlab.models.small.mlp",
                                               "hidden": [16], "dropout": 0.0,
                                               "ckpt": "/runs/g1/best.ckpt"}


def test_the_chain_reports_the_last_generation_and_the_first_ones_teachers():
    def results(k):
        return {"status": "finished", "test": {"acc": 0.5 + k / 10}, "test_last": {"acc": k},
                "val": {"acc": k / 10}, "best_epoch": k, "selection": {"epoch": k},
                "teachers": [{"name": f"teacher of {k}"}], "checkpoints": {"best": f"g{k}"}}

    summary = chain_summary([("/r/generation1", results(1)), ("/r/generation2", results(2))])
    assert summary["test"] == {"acc": 0.7} and summary["checkpoints"] == {"best": "g2"}
    assert summary["teachers"] == [{"name": "teacher of 1"}]
    assert summary["generations"] == [
        {"generation": 1, "run_dir": "/r/generation1", "best_epoch": 1, "selection": {"epoch": 1},
         "test": {"acc": 0.6}, "test_last": {"acc": 1}, "val": {"acc": 0.1}},
        {"generation": 2, "run_dir": "/r/generation2", "best_epoch": 2, "selection": {"epoch": 2},
         "test": {"acc": 0.7}, "test_last": {"acc": 2}, "val": {"acc": 0.2}}]
