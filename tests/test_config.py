"""Config composition (in-process, Hydra's compose API), the config search path, validation,
and packaging of conf/."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.cli import cli
from hydra import compose as raw_compose
from hydra import initialize_config_module
from hydra.errors import MissingConfigException

from kdlab.config import compose, conf_dir
from kdlab.errors import ConfigError, hydra_error_line
from kdlab.models import build_model, count_parameters
from kdlab.preflight import validate
from kdlab.teacher_config import teacher_specs

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_is_the_offline_digits_kd_run():
    cfg = compose([])
    assert cfg.dataset._target_.endswith("DigitsDataModule")
    assert cfg.method._target_ == "kdlab.methods.kd.KD"
    assert cfg.method.temperature == 4.0 and cfg.method.kd_weight == 0.9
    assert cfg.student._target_ == "kdlab.models.small.cnn" and cfg.student.width == 8
    assert cfg.teacher._target_ == "kdlab.models.small.cnn" and cfg.teacher.width == 32
    assert cfg.teacher.ckpt == "auto" and cfg.teacher.label_noise == "same"
    assert cfg.noise.type == "none"
    assert cfg.trainer.max_epochs == cfg.dataset.recipe.max_epochs
    assert dict(cfg.choices) == {"dataset": "digits", "student": "cnn_small", "teacher": "cnn",
                                 "method": "kd", "noise": "none"}


@pytest.mark.parametrize("dataset,student,teacher", [
    ("digits", "cnn_small", "cnn"), ("synthetic", "mlp_small", "mlp_large"),
    ("cifar10", "resnet8x4", "resnet32x4"), ("cifar100", "resnet8x4", "resnet32x4"),
    ("fashion_mnist", "vgg6", "vgg7x4")])
def test_each_dataset_brings_its_pair_and_the_command_line_wins(dataset, student, teacher):
    cfg = compose([f"dataset={dataset}"])
    assert (cfg.choices.student, cfg.choices.teacher) == (student, teacher)
    cfg = compose([f"dataset={dataset}", "student=mlp", "teacher=resnet8"])
    assert (cfg.choices.student, cfg.choices.teacher) == ("mlp", "resnet8")
    assert cfg.student._target_ == "kdlab.models.small.mlp"


def test_cifar_pair_composes_with_architecture_names():
    cfg = compose(["method=kd", "dataset=cifar100", "student=resnet8x4", "teacher=resnet32x4",
                   "teacher.ckpt=/weights/t.pth", "trainer.max_epochs=5",
                   "trainer.precision=bf16-mixed", "trainer.devices=2"])
    assert cfg.student._target_.endswith("resnet8x4")
    assert cfg.teacher._target_.endswith("resnet32x4")
    assert cfg.teacher.ckpt == "/weights/t.pth"
    assert cfg.trainer.max_epochs == 5 and cfg.trainer.devices == 2
    assert cfg.optimizer.lr == 0.05 and cfg.scheduler.schedule == "multistep"
    assert list(cfg.scheduler.milestones) == [150, 180, 210]


def test_raw_hydra_compose_sees_the_student_and_teacher_groups():
    """No start-up registration: the groups are folders (links to conf/model)."""
    with initialize_config_module("kdlab.conf", version_base="1.3"):
        cfg = raw_compose("train", overrides=["student=resnet8x4", "teacher=wrn_40_2"])
    assert cfg.student._target_.endswith("resnet8x4")
    assert cfg.teacher._target_.endswith("wrn_40_2") and cfg.teacher.ckpt == "auto"
    models = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
    for group in ("student", "teacher"):
        assert sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")) == models


@pytest.mark.parametrize("overrides,words", [
    (["+optimizer.learning_rate=0.1"], ["unknown key optimizer.learning_rate",
                                        "did you mean optimizer.lr?"]),
    (["optimizer.learning_rate=0.1"], ["did you mean optimizer.lr?"]),
    (["+trainer.max_epoch=3"], ["did you mean trainer.max_epochs?"]),
    (["+method.temprature=3"], ["did you mean method.temperature?"]),
    (["+teacher.lable_noise=none"], ["did you mean teacher.label_noise?"]),
    (["dataset.bogus=1"], ["unknown key dataset.bogus", "batch_size"]),
    (["+foo=1"], ["unknown key foo"]),
    (["method=multi_teacher_kd", "teachers=[{model: cnn, widht: 3}]"],
     ["did you mean teachers[0].width?"]),
    (["noise.rate=0.4"], ["noise.rate=0.4 with noise=none", "noise=symmetric noise.rate=0.4"]),
    (["noise=symmetric", "noise.rate=2"], ["noise.rate must be in [0, 1]"]),
    (["teacher.ckpt=/nope.ckpt"], ["teacher checkpoint not found: /nope.ckpt"]),
    (["teacher.label_noise=clean"], ["teacher.label_noise must be one of same, none"]),
    (["dataset=synthetic", "student=cnn"], ["cnn needs image inputs", "student=mlp_small"]),
    (["method=fitnet", "method.student_layer=nope"], ["method.student_layer='nope'"]),
    (["trainer.strategy=ddp_spawn"], ["ddp_spawn is not supported"]),
    (["dataset.meta_fraction=0.6", "dataset.val_fraction=0.5"], ["must be < 1"]),
])
def test_bad_configs_are_refused_with_one_line_naming_the_fix(overrides, words):
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_callbacks_take_new_keys_but_checked_against_their_target():
    cfg = compose(["+callbacks.lr={_target_: pytorch_lightning.callbacks.LearningRateMonitor}"])
    validate(cfg)
    with pytest.raises(ConfigError, match="did you mean callbacks.lr.logging_interval"):
        validate(compose(["+callbacks.lr={_target_: pytorch_lightning.callbacks."
                          "LearningRateMonitor, loging_interval: step}"]))


def test_every_config_folder_ships_as_a_package():
    """pyproject lists each conf/ folder (setuptools then installs them without warnings)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    folders = {"kdlab.conf." + str(d.relative_to(ROOT / "conf")).replace("/", ".")
               for d in (ROOT / "conf").rglob("*") if d.is_dir() and d.name != "__pycache__"}
    assert folders <= set(packages)


def test_conf_ships_in_the_wheel_without_setuptools_warnings(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "absent from the `packages`" not in out.stdout + out.stderr
    wheel = next(tmp_path.glob("kdlab-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("kdlab/conf/train.yaml", "kdlab/conf/method/kd.yaml",
              "kdlab/conf/model/resnet8x4.yaml", "kdlab/conf/student/resnet8x4.yaml",
              "kdlab/conf/teacher/resnet32x4.yaml", "kdlab/conf/dataset/digits.yaml",
              "kdlab/conf/optimizer/sgd.yaml", "kdlab/cli.py"):
        assert f in names


# -- the config search path: a user's config directory is seen everywhere ------------------


@pytest.fixture
def user_conf(tmp_path):
    """A user's config directory holding one model of its own (a narrow CNN)."""
    conf = tmp_path / "my_conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "mycnn.yaml").write_text("_target_: kdlab.models.small.cnn\nwidth: 4\n")
    return conf


def test_a_teachers_entry_finds_a_model_of_the_users_config_dir(user_conf):
    teachers = ["method=multi_teacher_kd", "teachers=[{model: mycnn}, {model: cnn}]"]
    for cfg in (compose(teachers, [user_conf]),
                compose([*teachers, f"hydra.searchpath=[file://{user_conf}]"])):
        mine, kdlabs = teacher_specs(cfg)
        assert (mine.name, mine.arch.width, kdlabs.name, kdlabs.arch.width) == (
            "mycnn", 4, "cnn", 32)
        validate(cfg)
    # a composition without the directory does not see it
    with pytest.raises(ConfigError, match="unknown model 'mycnn'; available: cnn, cnn_small"):
        teacher_specs(compose(teachers))


def test_group_files_are_read_once_until_one_changes(user_conf, monkeypatch):
    """Runs of one process (a sweep's, the tests') read each group file through Hydra once;
    an edited file on the search path is read again, and a composition without the user's
    directory does not see its files."""
    from kdlab import config
    from kdlab.models import model_config

    compose([], [user_conf])
    assert model_config("mycnn").width == 4
    reads = []
    real = config._config_loader
    monkeypatch.setattr(config, "_config_loader", lambda: reads.append(1) or real())
    assert model_config("mycnn").width == 4 and model_config("cnn").width == 32
    assert reads == [1]  # cnn only: mycnn came from the cache
    compose([], [user_conf])  # the next run's composition: the same files
    assert model_config("mycnn").width == 4 and reads == [1]
    mine = user_conf / "model" / "mycnn.yaml"
    mine.write_text(mine.read_text().replace("width: 4", "width: 12"))
    assert model_config("mycnn").width == 12 and len(reads) == 2
    compose([])
    with pytest.raises(ConfigError, match="unknown model 'mycnn'"):
        model_config("mycnn")


def test_a_users_model_in_a_teachers_list_trains_from_the_command_line(user_conf, tmp_path,
                                                                       cache_dir):
    run = tmp_path / "run"
    out = cli("train", "--config-dir", str(user_conf), "method=multi_teacher_kd",
              "teachers=[{model: mycnn}, {model: cnn}]", "trainer=cpu", "trainer.max_epochs=1",
              "teacher.max_epochs=1", "trainer.enable_progress_bar=false", "num_threads=1",
              f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((run / "results.json").read_text())
    narrow = build_model({"_target_": "kdlab.models.small.cnn", "width": 4}, 10, (1, 8, 8))
    assert [(t["name"], t["params"]) for t in results["teachers"]] == [
        ("mycnn", count_parameters(narrow)), ("cnn", count_parameters(build_model(
            "cnn", 10, (1, 8, 8))))]
    assert len(list((cache_dir / "teachers").glob("digits-mycnn-*/teacher.pt"))) == 1


def test_hydras_errors_become_one_line_from_their_types():
    missing = MissingConfigException("In 'hydra/config': Could not find 'hydra/launcher/x'\n...",
                                     missing_cfg_file="hydra/launcher/x",
                                     options=["basic", "joblib"])
    assert hydra_error_line(missing) == "unknown hydra/launcher 'x'; available: basic, joblib"
    # an unknown key, or a key below one: the unknown key is named, with what its node takes
    for override in ("trainer.nope=3", "trainer.nope.deeper=3"):
        with pytest.raises(ConfigError, match=r"^unknown key trainer.nope \(pytorch_lightning"
                                              r".Trainer takes: accelerator, devices, "):
            compose([override])
