"""Which teachers a config names, and how an auto-trained one is trained and cached.

* ``teacher`` or the ``teachers`` list: each entry a :class:`TeacherSpec` (its architecture,
  from ``model: NAME`` -- ``conf/model/NAME.yaml`` on the config search path -- or its own
  ``_target_``, and its options: ``ckpt``, ``allow_pickle``, how it is trained).
* ``ckpt: auto``: the teacher is trained first with CE on the **dataset's recipe**
  (``dataset.recipe``: epochs, SGD settings, schedule), whatever the student's optimiser,
  schedule or epochs; ``teacher.max_epochs``, ``teacher.lr``, ``teacher.weight_decay`` and
  ``teacher.label_noise`` (``same``: the run's noisy labels; ``none``: the clean labels of the
  same train split) change it. :func:`training_config` is that CE run's config and
  :func:`weights_cache_dir` its entry under ``paths.cache_dir/teachers``, keyed by everything
  that determines it. :mod:`kdlab.pipeline` trains it (once, under a file lock, when several
  jobs of a sweep need it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .config import TEACHER_OPTIONS, read_group
from .models import model_config
from .selection import selection_rule


@dataclass
class TeacherSpec:
    where: str            # its config key: teacher, teachers[1], ...
    name: str             # the config option (conf/model/<name>.yaml) or the _target_
    arch: DictConfig      # _target_ + architecture options
    options: dict[str, Any]  # ckpt, allow_pickle, label_noise, max_epochs, lr, weight_decay
    # The file its weights are loaded from: the ckpt given (a file, tv:<weights>), or for
    # ckpt=auto the auto-trained teacher's cached weights, once kdlab.pipeline trained it.
    weights: str | None = None

    @property
    def ckpt(self) -> str:
        return str(self.options.get("ckpt") or "auto")


# Options of `teacher` that the entries of a `teachers` list inherit unless they set their own:
# how an auto-trained teacher is trained (`teacher.label_noise=none` applies to all of them).
INHERITED_OPTIONS = ("label_noise", "max_epochs", "lr", "weight_decay")


def teacher_specs(cfg: DictConfig) -> list[TeacherSpec]:
    """The run's teachers: the ``teachers`` list when set, else ``teacher``."""
    inherited = {}
    if cfg.get("teachers"):
        nodes = [(f"teachers[{i}]", node, None) for i, node in enumerate(cfg.teachers)]
        inherited = {k: cfg.teacher[k] for k in INHERITED_OPTIONS
                     if cfg.get("teacher") is not None and cfg.teacher.get(k) is not None}
    else:
        nodes = [("teacher", cfg.teacher, (cfg.get("choices") or {}).get("teacher"))]
    specs = []
    for where, node, choice in nodes:
        data = OmegaConf.to_container(node, resolve=True)
        options = {**inherited, **{k: data.pop(k) for k in TEACHER_OPTIONS if k in data}}
        model = options.pop("model", None)
        arch = OmegaConf.merge(model_config(model), data) if model else OmegaConf.create(data)
        name = model or choice or str(arch.get("_target_", "?")).rsplit(".", 1)[-1]
        ckpt = str(options.get("ckpt") or "auto")
        specs.append(TeacherSpec(where, str(name), arch, options,
                                 weights=None if ckpt == "auto" else ckpt))
    return specs


# Trainer settings that change what an auto-trained teacher learns (part of its cache key).
TEACHER_TRAINER_KEYS = ("limit_train_batches", "limit_val_batches", "accumulate_grad_batches",
                        "gradient_clip_val")


def training_config(cfg: DictConfig, spec: TeacherSpec) -> DictConfig:
    """The CE run that trains teacher ``spec``: the same data, split and seed as ``cfg``, on
    the dataset's recipe (with the teacher's own overrides), one process, CSV log only."""
    teacher_cfg = cfg.copy()
    OmegaConf.set_struct(teacher_cfg, False)
    recipe = teacher_cfg.dataset.recipe
    for key in ("max_epochs", "lr", "weight_decay"):
        if spec.options.get(key) is not None:
            recipe[key] = spec.options[key]
    # a shortened recipe (teacher.max_epochs) never reaches its later milestones
    recipe.milestones = [m for m in recipe.get("milestones") or [] if m <= recipe.max_epochs]
    if str(spec.options.get("label_noise") or "same") == "none":
        teacher_cfg.noise = {"type": "none", "rate": 0.0}
    teacher_cfg.method = {"_target_": "kdlab.methods.ce.CE"}
    teacher_cfg.student = spec.arch
    teacher_cfg.teachers = None
    teacher_cfg.generations = 1
    teacher_cfg.resume = False
    teacher_cfg.choices = {**cfg.get("choices", {}), "method": "ce", "student": spec.name,
                           "teacher": None, "noise": teacher_cfg.noise.type}
    teacher_cfg.optimizer = read_group("optimizer", "sgd")
    teacher_cfg.scheduler = read_group("scheduler", "recipe")
    teacher_cfg.trainer.max_epochs = "${dataset.recipe.max_epochs}"
    # Selection sees every epoch of the teacher (its epochs need not suit the student's
    # validation cadence).
    teacher_cfg.trainer.check_val_every_n_epoch = 1
    # One process: a nested multi-process launch would re-run this whole script.
    teacher_cfg.trainer.strategy = "auto"
    teacher_cfg.trainer.devices = 1
    teacher_cfg.logger = {"csv": cfg.logger.csv} if "csv" in (cfg.logger or {}) else {}
    teacher_cfg.callbacks = {}
    OmegaConf.resolve(teacher_cfg)
    return teacher_cfg


def weights_cache_dir(teacher_cfg: DictConfig) -> Path:
    """Cache entry keyed by everything that determines a CE-trained teacher."""
    dataset = OmegaConf.to_container(teacher_cfg.dataset, resolve=True)
    # where/how the data is read changes nothing (its content is the same or refused)
    for k in ("root", "system_root", "url", "download", "num_workers"):
        dataset.pop(k, None)
    dataset.get("recipe", {}).pop("num_threads", None)
    key_source = {
        "dataset": dataset,
        "noise": OmegaConf.to_container(teacher_cfg.noise, resolve=True),
        "arch": OmegaConf.to_container(teacher_cfg.student, resolve=True),
        "optimizer": OmegaConf.to_container(teacher_cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(teacher_cfg.scheduler, resolve=True),
        "max_epochs": teacher_cfg.trainer.max_epochs,
        "precision": teacher_cfg.trainer.precision,
        # which batches it trains and validates on, and how steps are taken
        "trainer": {k: teacher_cfg.trainer.get(k) for k in TEACHER_TRAINER_KEYS},
        "seed": teacher_cfg.seed,
        # which of its epochs the students learn from
        "selection": selection_rule(teacher_cfg).as_dict(),
    }
    digest = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
    dataset_name = teacher_cfg.choices.get("dataset") or "data"
    return (Path(teacher_cfg.paths.cache_dir) / "teachers"
            / f"{dataset_name}-{teacher_cfg.choices.student}-{digest}")


def selected_checkpoint(entry: Path) -> str | None:
    """Which checkpoint of the auto-trained teacher in cache ``entry`` the students learn
    from (``epoch 27 of 30, best val/acc, ties broken by ...``), from its meta.json."""
    try:
        meta = json.loads((Path(entry) / "meta.json").read_text())
        selection = meta["selection"]
        return f"epoch {selection['epoch']} of {meta['epochs']}, {selection['rule']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recipe_line(teacher_cfg: DictConfig) -> str:
    """``30 epochs, SGD lr 0.05 (momentum 0.9, wd 0.0005), cosine schedule, noisy labels``."""
    r = teacher_cfg.dataset.recipe
    labels = ("clean labels" if teacher_cfg.noise.type == "none"
              else f"{teacher_cfg.noise.type} {teacher_cfg.noise.rate} noisy labels")
    return (f"{r.max_epochs} epochs, SGD lr {r.lr:g} (momentum {r.momentum:g}, "
            f"wd {r.weight_decay:g}{', nesterov' if r.nesterov else ''}), {r.schedule} "
            f"schedule, {labels}")
