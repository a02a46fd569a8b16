"""What a ``kdlab train`` run is about to do, in a few lines printed before any work.

For each teacher: loaded from a file, reused from the auto-trained teacher cache, or trained
with CE first (its recipe, from :func:`kdlab.teacher_config.recipe_line`); then the student:
method, epochs, optimiser and learning-rate schedule, batch, data and trainer. After the first
epoch :class:`kdlab.callbacks.RunEstimate` adds how long the whole run should take.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .methods import instantiate_method
from .preflight import device_count
from .selection import selection_rule
from .teacher_config import (
    recipe_line,
    selected_checkpoint,
    teacher_specs,
    training_config,
    weights_cache_dir,
)

SHORT = {"weight_decay": "wd"}  # as kdlab.teacher_config.recipe_line writes it
SCHEDULES = {"CosineAnnealingLR": "cosine", "MultiStepLR": "multistep", "ConstantLR": "constant"}


def _short(target: Any) -> str:
    return str(target or "?").rsplit(".", 1)[-1]


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def optimizer_line(optimizer: DictConfig) -> str:
    """``SGD lr 0.05 (momentum 0.9, wd 0.0005)``."""
    node = OmegaConf.to_container(optimizer, resolve=True)
    extras = [f"{SHORT.get(k, k)} {_number(v)}" for k, v in node.items()
              if not k.startswith("_") and k != "lr" and v is not False and v is not None]
    lr = f" lr {_number(node['lr'])}" if "lr" in node else ""
    return f"{_short(node.get('_target_'))}{lr}" + (f" ({', '.join(extras)})" if extras else "")


def schedule_line(scheduler: DictConfig | None) -> str:
    """``multistep schedule (x0.1 at epochs 150, 180, 210)``, ``cosine schedule``, ..."""
    if not scheduler:
        return "constant learning rate"
    node = OmegaConf.to_container(scheduler, resolve=True)
    target = _short(node.get("_target_"))
    name = node.get("schedule") or SCHEDULES.get(target, target)
    if name == "multistep":
        steps = ", ".join(str(m) for m in node.get("milestones") or [])
        return (f"multistep schedule (x{_number(node.get('gamma', 0.1))} at epochs {steps})"
                if steps else "multistep schedule (no milestones: constant)")
    return f"{name} schedule"


def teacher_lines(cfg: DictConfig) -> list[str]:
    method = cfg.choices.get("method") or _short(cfg.method.get("_target_"))
    if not instantiate_method(cfg.method).needs_teacher:
        return [f"teacher: none (method {method} does not use one)"]
    lines = []
    for spec in teacher_specs(cfg):
        if spec.ckpt != "auto":
            lines.append(f"teacher {spec.name}: load {spec.ckpt}")
            continue
        teacher_cfg = training_config(cfg, spec)
        entry = weights_cache_dir(teacher_cfg)
        if (entry / "teacher.pt").is_file():
            chosen = selected_checkpoint(entry) or "its best epoch"
            lines.append(f"teacher {spec.name}: reuse the auto-trained teacher "
                         f"{entry / 'teacher.pt'} ({chosen}; CE: {recipe_line(teacher_cfg)})")
        else:
            lines.append(f"teacher {spec.name}: train with CE first: {recipe_line(teacher_cfg)}"
                         f" -> {entry}; the students learn from the epoch its selection "
                         f"picks ({selection_rule(teacher_cfg).describe()})")
    return lines


def student_line(cfg: DictConfig) -> str:
    choices = cfg.get("choices") or {}
    student = choices.get("student") or _short(cfg.student.get("_target_"))
    method = choices.get("method") or _short(cfg.method.get("_target_"))
    noise = cfg.noise
    labels = "clean labels" if noise.type == "none" else f"{noise.type} {noise.rate} noisy labels"
    per_device = " per device" if _processes(cfg.trainer) != 1 else ""
    return (f"student {student}, method {method}: {cfg.trainer.max_epochs} epochs, "
            f"{optimizer_line(cfg.optimizer)}, {schedule_line(cfg.get('scheduler'))}, batch "
            f"{cfg.dataset.batch_size}{per_device}, on {choices.get('dataset') or 'the dataset'}"
            f" ({labels}), seed {cfg.seed}; selection: {selection_rule(cfg).describe()}")


def _devices(trainer: DictConfig) -> int:
    """The devices per node: ``trainer.devices``, or for auto/-1 those Lightning will find
    (every CUDA GPU when it runs on them, else one)."""
    devices = device_count(trainer.get("devices", 1))
    if devices is not None:
        return devices
    on_gpu = str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda")
    return max(torch.cuda.device_count(), 1) if on_gpu and torch.cuda.is_available() else 1


def _processes(trainer: DictConfig) -> int:
    """Training processes: devices x nodes."""
    return _devices(trainer) * int(trainer.get("num_nodes", 1))


def distributed_line(cfg: DictConfig) -> str | None:
    """For several processes: the strategy, the global batch, and that lr is not scaled."""
    t = cfg.trainer
    processes = _processes(t)
    if processes == 1:
        return None
    strategy = str(t.get("strategy", "auto"))
    shown = ("ddp (Lightning's choice for strategy=auto)" if strategy == "auto" else strategy)
    batch = int(cfg.dataset.batch_size)
    return (f"distributed: strategy {shown}, one process per device; global batch "
            f"{_devices(t)} devices x {t.get('num_nodes', 1)} node(s) x {batch} = "
            f"{processes * batch}; optimizer.lr {_number(cfg.optimizer.get('lr'))} is used as "
            "given, not scaled with the global batch (scale it yourself, e.g. linearly)")


def trainer_line(cfg: DictConfig) -> str:
    t = cfg.trainer
    return (f"trainer: accelerator {t.accelerator}, devices {t.devices}, precision "
            f"{t.precision}; an estimate of the whole run's time follows the first epoch")


def describe_plan(cfg: DictConfig) -> str:
    """The plan of the run ``cfg`` as a few lines (teachers, student, trainer)."""
    lines = [*teacher_lines(cfg), student_line(cfg), trainer_line(cfg)]
    distributed = distributed_line(cfg)
    if distributed:
        lines.append(distributed)
    return "plan:\n" + "\n".join(f"  {line}" for line in lines)


__all__ = ["describe_plan", "optimizer_line", "schedule_line"]
