"""The published CIFAR-100 recipes in conf/experiment compose to the standard recipe
(REFERENCE.md: SGD, 240 epochs, batch 64, lr 0.05 / 0.01, x0.1 at 150/180/210)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from helpers.context import FakeContext
from omegaconf import OmegaConf
from torch import nn

from kdlab.config import compose
from kdlab.methods import instantiate_method

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"
ALL = sorted(p.stem for p in EXPERIMENTS.glob("cifar100_*.yaml") if "_alm_" not in p.stem)

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
# Published top-1 of the base columns (DKD paper, CIFAR-100 table; REFERENCE.md), by pair:
# teacher, student CE, KD, FitNet, CRD, DKD.
BASE_PUBLISHED = {pair: dict(zip(("teacher", "student_ce", "kd", "fitnet", "crd", "dkd"), row,
                                 strict=True)) for pair, row in {
    ("wrn_40_2", "wrn_16_2"): (75.61, 73.26, 74.92, 73.58, 75.48, 76.23),
    ("wrn_40_2", "wrn_40_1"): (75.61, 71.98, 73.54, 72.24, 74.14, 74.81),
    ("resnet56", "resnet20"): (72.34, 69.06, 70.66, 69.21, 71.16, 71.97),
    ("resnet110", "resnet32"): (74.31, 71.14, 73.08, 71.06, 73.48, 74.11),
    ("resnet32x4", "resnet8x4"): (79.42, 72.50, 73.33, 73.50, 75.51, 76.32),
    ("vgg13", "vgg8"): (74.64, 70.36, 72.98, 71.02, 73.94, 74.68),
    ("resnet32x4", "shufflenetv2"): (79.42, 71.82, 74.45, 73.54, 75.65, 77.07),
}.items()}
# Published top-1 of the other baselines, by pair (REFERENCE.md and the sources in
# docs/methods.md); a pair a source gives no number for has no entry.
PUBLISHED = {
    ("wrn_40_2", "wrn_16_2"): {"at": 74.08, "rkd": 73.35, "ctkd": 75.45, "kd_ls": 76.11,
                               "dkd_ls": 76.39},
    ("wrn_40_2", "wrn_40_1"): {"at": 72.77, "rkd": 72.22, "dist": 74.43, "reviewkd": 75.09,
                               "ctkd": 73.93, "kd_ls": 74.37, "dkd_ls": 74.89, "nd": 74.59,
                               "nd_dkd": 75.02},
    ("resnet56", "resnet20"): {"at": 70.55, "rkd": 69.61, "dist": 71.75, "reviewkd": 71.89,
                               "ctkd": 71.19, "kd_ls": 71.43, "dkd_ls": 72.32, "nd": 72.53,
                               "nd_dkd": 72.16},
    ("resnet110", "resnet32"): {"at": 72.31, "rkd": 71.82, "ctkd": 73.52, "kd_ls": 74.17,
                                "dkd_ls": 74.29},
    ("resnet32x4", "resnet8x4"): {"at": 73.44, "rkd": 71.90, "dist": 76.31, "reviewkd": 75.63,
                                  "ctkd": 73.39, "kd_ls": 76.62, "dkd_ls": 77.01, "nd": 75.54,
                                  "nd_dkd": 76.28},
    ("vgg13", "vgg8"): {"at": 71.43, "rkd": 71.48, "reviewkd": 74.84, "ctkd": 73.52,
                        "kd_ls": 74.36, "dkd_ls": 74.81},
    ("resnet32x4", "shufflenetv2"): {"at": 72.73, "rkd": 73.21, "dist": 77.35, "reviewkd": 77.78,
                                     "ctkd": 75.37, "kd_ls": 75.56, "dkd_ls": 77.37, "nd": 76.42,
                                     "nd_dkd": 77.49},
}
# Per-pair settings from the papers' scripts: ReviewKD's weight, KD++ (kd_weight, nd_weight),
# DKD++ (alpha, beta, nd_weight), KD+LS's temperature. Pairs a script does not cover use the
# method's defaults (resnet32x4 -> resnet8x4's values for ND, 5 for ReviewKD, 2 for KD+LS).
REVIEWKD_WEIGHT = {("resnet32x4", "shufflenetv2"): 8.0, ("resnet56", "resnet20"): 0.6,
                   ("resnet110", "resnet32"): 1.0}
KD_PP = {("wrn_40_2", "wrn_40_1"): (1.0, 1.5), ("resnet56", "resnet20"): (1.0, 2.0),
         ("resnet32x4", "resnet8x4"): (3.5, 2.0), ("resnet32x4", "shufflenetv2"): (4.0, 0.5)}
DKD_PP = {("wrn_40_2", "wrn_40_1"): (1.0, 6.0, 1.0), ("resnet56", "resnet20"): (2.5, 4.0, 3.5),
          ("resnet32x4", "resnet8x4"): (2.0, 8.0, 0.5),
          ("resnet32x4", "shufflenetv2"): (0.5, 6.0, 0.5)}
KD_LS_TEMPERATURE = {("vgg13", "vgg8"): 3.0}
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
    assert cfg["published"] == {**BASE_PUBLISHED[pair], **PUBLISHED[pair]}
    for method in ("ce", "fitnet", "at", "rkd", "crd", "dist", "ctkd"):  # no per-pair options
        instantiate_method(compose([f"experiment={name}", f"method={method}"]).method)
    dkd = instantiate_method(compose([f"experiment={name}", "method=dkd"]).method)
    assert dkd.beta == PAIRS[pair]
    assert (dkd.alpha, dkd.temperature, dkd.warmup_epochs) == (1.0, 4.0, 20)


@pytest.mark.parametrize("pair", sorted(PAIRS), ids="->".join)
def test_pair_settings_of_the_other_baselines(pair):
    """`-m method=...` over a pair picks up each paper's per-pair settings."""
    name = f"cifar100_{pair[0]}_{pair[1]}"

    def method(which):
        return instantiate_method(compose([f"experiment={name}", f"method={which}"]).method)

    dkd_ls = method("dkd_ls")  # the LS authors multiply DKD's alpha and beta by 9, T = 2
    assert (dkd_ls.alpha, dkd_ls.beta, dkd_ls.temperature) == (9.0, 9 * PAIRS[pair], 2.0)
    assert dkd_ls.logit_standardization
    kd_ls = method("kd_ls")
    assert (kd_ls.temperature, kd_ls.kd_weight) == (KD_LS_TEMPERATURE.get(pair, 2.0), 9.0)
    assert method("reviewkd").weight == REVIEWKD_WEIGHT.get(pair, 5.0)
    kd_pp = method("nd")
    assert (kd_pp.base, kd_pp.kd_weight, kd_pp.nd_weight) == ("kd", *KD_PP.get(pair, (3.5, 2.0)))
    dkd_pp = method("nd_dkd")
    assert (dkd_pp.base, dkd_pp.alpha, dkd_pp.beta, dkd_pp.nd_weight) == (
        "dkd", *DKD_PP.get(pair, (2.0, 8.0, 0.5)))


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


def test_per_pair_settings_default_outside_the_experiments_and_yield_to_the_command_line():
    assert compose(["method=dkd_ls"]).method.beta == 72.0
    assert compose(["method=reviewkd"]).method.weight == 5.0
    assert compose(["method=kd_ls"]).method.temperature == 2.0
    nd = compose(["method=nd"]).method
    assert (nd.kd_weight, nd.nd_weight) == (3.5, 2.0)
    cfg = compose(["experiment=cifar100_resnet56_resnet20", "method=nd", "method.nd_weight=9"])
    assert (cfg.method.nd_weight, cfg.method.kd_weight) == (9, 1.0)


def test_alm_kd_experiment_is_the_authors_cifar100_setting():
    """REFERENCE.md: ResNet56 -> ResNet8, SGD lr 0.1 (momentum 0.9, Nesterov, wd 5e-4),
    batch 128, 200 epochs, x0.1 at 150 and 180, symmetric noise 0.4, clean-label teacher,
    a meta pass every 10 epochs from epoch 10 over chunks of 3 batches."""
    cfg = resolved(["experiment=cifar100_alm_resnet56_resnet8"])
    assert (cfg["choices"]["teacher"], cfg["choices"]["student"]) == ("resnet56", "resnet8")
    assert cfg["dataset"]["_target_"] == "kdlab.data.cifar.Cifar100DataModule"
    assert (cfg["dataset"]["batch_size"], cfg["dataset"]["augment"]) == (128, True)
    assert (cfg["noise"]["type"], cfg["noise"]["rate"]) == ("symmetric", 0.4)
    assert cfg["teacher"]["label_noise"] == "none"
    opt, sched = cfg["optimizer"], cfg["scheduler"]
    assert (opt["lr"], opt["momentum"], opt["weight_decay"], opt["nesterov"]) == (
        0.1, 0.9, 5e-4, True)
    assert cfg["trainer"]["max_epochs"] == 200
    assert (sched["schedule"], sched["milestones"], sched["gamma"]) == ("multistep", [150, 180],
                                                                        0.1)
    assert cfg["dataset"]["recipe"]["lr"] == 0.1  # the teacher is trained on the same recipe
    method = instantiate_method(compose(["experiment=cifar100_alm_resnet56_resnet8"]).method)
    assert type(method).__name__ == "ALMKD" and method.chunk_batches == 3
    x = torch.zeros(6, 4)
    method.setup(FakeContext(nn.Linear(4, 100), (nn.Linear(4, 100),), num_classes=100,
                             data={"train": (x, torch.zeros(6, dtype=torch.long))},
                             max_epochs=cfg["trainer"]["max_epochs"]))
    assert [e for e in range(200) if method.is_meta_epoch(e)] == list(range(10, 200, 10))
