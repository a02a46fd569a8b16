"""Which teachers a config names (``teacher``, a ``teachers`` list with model names from the
config search path) and the config and cache key of an auto-trained teacher."""

from __future__ import annotations

import torch

from kdlab.config import compose
from kdlab.data.digits import DigitsDataModule
from kdlab.teacher_config import teacher_specs, training_config, weights_cache_dir


def entry(overrides):
    cfg = compose(overrides)
    return weights_cache_dir(training_config(cfg, teacher_specs(cfg)[0]))


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
