"""Config composition (in-process, Hydra's compose API) and packaging of conf/."""

import subprocess
import sys
import zipfile

from kdlab.config import compose, conf_dir, model_kwargs


def test_default_config_is_the_offline_digits_kd_run():
    cfg = compose([])
    assert cfg.dataset._target_.endswith("DigitsDataModule")
    assert cfg.method._target_ == "kdlab.methods.kd.KD"
    assert cfg.method.temperature == 4.0 and cfg.method.kd_weight == 0.9
    assert cfg.student.name == "cnn" and cfg.student.width == 8
    assert cfg.teacher.name == "cnn" and cfg.teacher.ckpt == "auto"
    assert cfg.noise.type == "none"
    assert cfg.trainer.max_epochs == cfg.dataset.recipe.max_epochs


def test_cifar_pair_composes_with_architecture_names():
    cfg = compose(["method=kd", "dataset=cifar100", "student=resnet8x4", "teacher=resnet32x4",
                   "teacher.ckpt=/weights/t.pth", "trainer.max_epochs=5",
                   "trainer.precision=bf16-mixed", "trainer.devices=2"])
    assert cfg.student.name == "resnet8x4" and cfg.teacher.name == "resnet32x4"
    assert cfg.teacher.ckpt == "/weights/t.pth"
    assert cfg.dataset._target_.endswith("Cifar100DataModule")
    assert cfg.trainer.max_epochs == 5 and cfg.trainer.devices == 2
    assert cfg.optimizer.lr == 0.05 and list(cfg.scheduler.milestones) == [150, 180, 210]


def test_student_and_teacher_groups_mirror_the_model_group():
    models = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    assert {"resnet8x4", "resnet32x4", "wrn_40_2", "mlp", "cnn"} <= set(models)
    for name in models:
        cfg = compose([f"student={name}", f"teacher={name}"])
        assert cfg.student.name == cfg.teacher.name
        assert model_kwargs(cfg.student) == model_kwargs(cfg.teacher)
        assert cfg.teacher.ckpt == "auto" and "ckpt" not in cfg.student


def test_conf_ships_in_the_wheel(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    wheel = next(tmp_path.glob("kdlab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("kdlab/conf/train.yaml", "kdlab/conf/method/kd.yaml",
              "kdlab/conf/model/resnet8x4.yaml", "kdlab/conf/dataset/digits.yaml",
              "kdlab/cli.py"):
        assert f in names
