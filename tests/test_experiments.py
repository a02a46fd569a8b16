"""The published CIFAR-100 recipes in conf/experiment compose to the standard recipe
(REFERENCE.md: SGD, 240 epochs, batch 64, lr 0.05 / 0.01, x0.1 at 150/180/210)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kdlab.config import compose, instantiate_method

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"
ALL = sorted(p.stem for p in EXPERIMENTS.glob("cifar100_*.yaml"))

# teacher -> student pairs of the published table, with DKD's beta for each
PAIRS = {
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
    ("resnet32x4", "resnet8x4"): 8.0,
    ("vgg13", "vgg8"): 6.0,
    ("resnet32x4", "shufflenetv2"): 8.0,
}
TEACHERS = sorted({t for t, _ in PAIRS})
SMALL_LR_STUDENTS = {"mobilenetv2", "shufflenetv1", "shufflenetv2"}


@cache
def _resolved(overrides: tuple[str, ...]) -> dict:
    return OmegaConf.to_container(compose(list(overrides)), resolve=True)


def resolved(overrides):
    """The composed, resolved config (each experiment is composed once per session)."""
    return _resolved(tuple(overrides))


def test_every_pair_and_teacher_has_an_experiment():
    expected = {f"cifar100_{t}_{s}" for t, s in PAIRS} | {f"cifar100_teacher_{t}" for t in TEACHERS}
    assert expected <= set(ALL)
    assert set(ALL) - expected == {"cifar100_recipe"}


@pytest.mark.parametrize("name", ALL)
def test_experiment_is_the_standard_recipe(name):
    cfg = resolved([f"experiment={name}"])
    assert cfg["dataset"]["_target_"] == "kdlab.data.cifar.Cifar100DataModule"
    assert cfg["dataset"]["batch_size"] == 64
    assert cfg["dataset"]["augment"] is True
    assert cfg["trainer"]["max_epochs"] == 240
    opt, sched = cfg["optimizer"], cfg["scheduler"]
    assert (opt["_target_"], opt["momentum"], opt["weight_decay"]) == ("torch.optim.SGD", 0.9,
                                                                       5e-4)
    assert opt["nesterov"] is False
    assert (sched["schedule"], sched["milestones"], sched["gamma"]) == (
        "multistep", [150, 180, 210], 0.1)
    student = cfg["choices"]["student"]
    assert opt["lr"] == (0.01 if student in SMALL_LR_STUDENTS else 0.05)
    # auto-trained teachers follow the recipe, never the student's lr
    assert cfg["dataset"]["recipe"]["lr"] == 0.05


@pytest.mark.parametrize("pair", sorted(PAIRS), ids="->".join)
def test_pair_experiment(pair):
    teacher, student = pair
    name = f"cifar100_{teacher}_{student}"
    cfg = resolved([f"experiment={name}"])
    assert (cfg["choices"]["teacher"], cfg["choices"]["student"]) == (teacher, student)
    assert cfg["method"]["_target_"] == "kdlab.methods.kd.KD"  # the default; overridable
    assert set(cfg["published"]) == {"teacher", "student_ce", "kd", "fitnet", "crd", "dkd"}
    for method in ("ce", "fitnet"):  # methods without per-pair options compose unchanged
        instantiate_method(compose([f"experiment={name}", f"method={method}"]).method)
    dkd = instantiate_method(compose([f"experiment={name}", "method=dkd"]).method)
    assert dkd.beta == PAIRS[pair]
    assert (dkd.alpha, dkd.temperature, dkd.warmup_epochs) == (1.0, 4.0, 20)


@pytest.mark.parametrize("teacher", TEACHERS)
def test_teacher_experiment(teacher):
    cfg = resolved([f"experiment=cifar100_teacher_{teacher}"])
    assert cfg["choices"]["student"] == teacher
    assert cfg["method"]["_target_"] == "kdlab.methods.ce.CE"


def test_command_line_wins_over_the_experiment():
    cfg = compose(["experiment=cifar100_resnet56_resnet20", "method=dkd", "method.beta=3",
                   "student=resnet8", "trainer.max_epochs=5", "optimizer.lr=0.1"])
    assert (cfg.method.beta, cfg.choices.student, cfg.trainer.max_epochs) == (3, "resnet8", 5)
    assert cfg.optimizer.lr == 0.1


def test_dkd_beta_defaults_to_8_outside_the_experiments():
    assert compose(["method=dkd"]).method.beta == 8.0
