"""The ImageNet recipes (conf/experiment/imagenet_*.yaml) compose to mdistiller's settings
(REFERENCE.md: SGD momentum 0.9, lr 0.2 at batch 512, 100 epochs, x0.1 at 30/60/90, weight
decay 1e-4; KD T 1, weights 0.5 / 0.5; torchvision's pretrained teachers), and
scripts/reproduce_imagenet.py prints their plan and runs it."""

from __future__ import annotations

import pytest
import torch
from helpers.scripts import loaded_script
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kdlab.config import compose
from kdlab.methods import instantiate_method
from kdlab.teacher_config import teacher_specs

PAIRS = {  # experiment: (student, teacher, teacher weights)
    "imagenet_resnet34_resnet18": ("tv_resnet18", "tv_resnet34",
                                   "tv:ResNet34_Weights.IMAGENET1K_V1"),
    "imagenet_resnet50_mobilenetv1": ("mobilenetv1", "tv_resnet50",
                                      "tv:ResNet50_Weights.IMAGENET1K_V1"),
}
# The DKD paper's ImageNet table (REFERENCE.md): teacher, student, KD, AT, OFD, CRD, ReviewKD, DKD
PUBLISHED = {
    "imagenet_resnet34_resnet18": (73.31, 69.75, 70.66, 70.69, 70.81, 71.17, 71.61, 71.70),
    "imagenet_resnet50_mobilenetv1": (76.16, 68.87, 68.58, 69.56, 71.25, 71.37, 72.56, 72.05),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_imagenet_experiment_is_mdistillers_recipe(name):
    cfg = compose([f"experiment={name}", "dataset.path=/chunks/train"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    student, teacher, weights = PAIRS[name]
    assert (plain["choices"]["student"], plain["choices"]["teacher"]) == (student, teacher)
    assert plain["choices"]["dataset"] == "streaming"
    data = plain["dataset"]
    assert (data["batch_size"], data["crop_size"], data["resize_size"]) == (512, 224, 256)
    assert data["scale"] == [0.08, 1.0] and data["augment"] is True
    assert plain["trainer"]["max_epochs"] == 100
    opt = plain["optimizer"]
    assert (opt["_target_"], opt["lr"], opt["momentum"], opt["weight_decay"], opt["nesterov"]) \
        == ("torch.optim.SGD", 0.2, 0.9, 1e-4, False)
    # the schedule as it runs: lr 0.2 x 0.1 at epochs 30, 60 and 90
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = instantiate(cfg.optimizer)([param])
    scheduler = instantiate(cfg.scheduler)(optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.2 * 0.1 ** sum(epoch >= m for m in (30, 60, 90)) for epoch in range(100)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    kd = instantiate_method(cfg.method)
    assert type(kd).__name__ == "KD"
    assert (kd.temperature, kd.ce_weight, kd.kd_weight) == (1.0, 0.5, 0.5)
    (spec,) = teacher_specs(cfg)
    assert spec.weights == weights  # torchvision's pretrained weights, no teacher training
    import torchvision

    assert torchvision.models.get_weight(weights[3:]).meta["num_params"] > 0
    keys = ("teacher", "student_ce", "kd", "at", "ofd", "crd", "reviewkd", "dkd")
    assert plain["published"] == dict(zip(keys, PUBLISHED[name], strict=True))


def test_kd_keeps_its_cifar_defaults_outside_the_imagenet_experiments():
    kd = instantiate_method(compose(["method=kd"]).method)
    assert (kd.temperature, kd.ce_weight, kd.kd_weight) == (4.0, 0.1, 0.9)
    cfg = compose(["experiment=imagenet_resnet34_resnet18", "method.temperature=2",
                   "dataset.batch_size=64"])
    assert (cfg.method.temperature, cfg.method.ce_weight, cfg.dataset.batch_size) == (2, 0.5, 64)
    dkd = instantiate_method(compose(["experiment=imagenet_resnet34_resnet18",
                                      "method=dkd"]).method)
    assert dkd.temperature == 4.0  # the KD settings are KD's only


@pytest.fixture(scope="module")
def script():
    yield from loaded_script("reproduce_imagenet")


FLOPS = {"tv_resnet18": 3.6e9, "tv_resnet34": 7.3e9, "mobilenetv1": 1.1e9, "tv_resnet50": 8.2e9}


def test_dry_run_prints_the_plan_and_its_gpu_hours(script, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(script, "forward_flops", lambda arch: FLOPS[arch])
    out_dir = tmp_path / "out"
    assert script.main(["--dry-run", "--out", str(out_dir), "--methods", "ce,kd"],
                       kdlab=None) == 0
    out = capsys.readouterr().out
    assert not out_dir.exists()
    # 98% of 1,281,167 images trained on (1% meta, 1% val held out); 8 GPUs at 50 TFLOP/s
    # but at most 3000 images/s each; the held-out images once per epoch, 50,000 test images
    # twice at the end; 100 epochs
    n, held_out, rate, most = round(1_281_167 * 0.98), 1_281_167 - round(1_281_167 * 0.98), \
        8 * 50e12, 8 * 3000
    total = 0.0
    for student, teacher in (("tv_resnet18", "tv_resnet34"), ("mobilenetv1", "tv_resnet50")):
        for reads in (0, FLOPS[teacher]):  # ce, kd
            epoch = max(n * (3 * FLOPS[student] + reads) / rate, n / most) \
                + held_out * FLOPS[student] / rate
            total += (100 * epoch + 100_000 * (FLOPS[student] + reads) / rate) * 8 / 3600
    assert f"total: 4 runs, 0 finished (skipped); estimated {total:.0f} GPU hours to go" in out
    assert f"{n:,}" in out and "at most 3000 images/s per GPU" in out
    assert "50 TFLOP/s effective per GPU" in out
    commands = [line.strip() for line in out.splitlines() if line.startswith("  kdlab train")]
    assert len(commands) == 4
    assert commands[1].startswith("kdlab train experiment=imagenet_resnet34_resnet18 method=kd "
                                  "seed=0 ")
    assert "trainer=ddp trainer.accelerator=gpu trainer.devices=8 dataset.batch_size=64" in \
        commands[1]


def test_the_plan_runs_each_unfinished_run_then_the_report(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "forward_flops", lambda arch: FLOPS[arch])
    out_dir = tmp_path / "out"
    done = out_dir / "imagenet_resnet34_resnet18" / "kd-seed0"
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    calls = []
    argv = ["--out", str(out_dir), "--train", "s3://bucket/train", "--val", "/data/val",
            "--gpus", "1", "--epochs", "10", "--", "trainer.precision=bf16-mixed"]
    assert script.main(argv, kdlab=lambda args: calls.append(args) or 0) == 0
    (train, report) = calls
    run_dir = (out_dir / "imagenet_resnet50_mobilenetv1" / "kd-seed0").resolve()
    assert train == ["train", "experiment=imagenet_resnet50_mobilenetv1", "method=kd", "seed=0",
                     "dataset.path=s3://bucket/train", "dataset.test_path=/data/val",
                     "dataset.recipe.max_epochs=10", "dataset.recipe.milestones=[3,6,9]",
                     "resume=true",
                     f"hydra.run.dir={run_dir}",
                     "trainer.precision=bf16-mixed"]
    assert report[:4] == ["report", str(out_dir), "--by", "experiment,method"]
    with pytest.raises(SystemExit):
        script.main(["--out", str(out_dir)], kdlab=None)  # no data: refused before running
