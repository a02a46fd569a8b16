"""Whether a composed config can run, decided before anything is created.

:func:`validate`: every ``_target_`` node's keys are checked against its callable's signature
(with a "did you mean" for typos), values against their ranges, files that must exist, the
models, datamodule and method built for the data (without reading it), and the logger set-up.
The CLI runs it before Hydra makes the run directory; :func:`kdlab.pipeline.run` runs it again
for configs composed in scripts and notebooks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from .config import TEACHER_OPTIONS, check_signature, nodes_with_target
from .data import instantiate_datamodule
from .data.noise import check_noise as check_noise_values
from .errors import ConfigError
from .loggers import check_wandb
from .methods import Method, instantiate_method
from .metrics import classification_metrics
from .models import build_model
from .selection import selection_rule
from .teacher_config import teacher_specs, training_config

LABEL_NOISE = ("same", "none")
TEACHER_CACHE_MODES = ("auto", "memory", "disk", "views", "off")


# -- values --------------------------------------------------------------------------------


def check_noise(noise: DictConfig) -> None:
    check_noise_values(str(noise.get("type", "none")), noise.get("rate", 0.0))
    unknown = set(noise) - {"type", "rate", "class_map"}
    if unknown:
        raise ConfigError(f"unknown key noise.{sorted(unknown)[0]}; noise takes: type, rate, "
                          "class_map")


# -- numbers: plain functions of a config (or one of its nodes), one error line each -----


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_int(where: str, value: Any, low: int, high: int | None = None,
                why: str = "") -> int:
    """``value`` as an integer in [low, high], else a one-line ConfigError."""
    if not _is_int(value) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(f"{where} must be an integer {bound}{why}, got {value!r}")
    return value


def require_number(where: str, value: Any, low: float, high: float | None = None,
                   low_open: bool = False, high_open: bool = False, why: str = "") -> float:
    """``value`` as a number in the interval (open or closed at either end), else a one-line
    ConfigError naming the interval."""
    too_low = _is_number(value) and (value <= low if low_open else value < low)
    too_high = _is_number(value) and high is not None and (
        value >= high if high_open else value > high)
    if not _is_number(value) or value != value or too_low or too_high:
        if high is None:
            bound = f"{'>' if low_open else '>='} {low:g}"
        else:
            bound = (f"in {'(' if low_open else '['}{low:g}, {high:g}"
                     f"{')' if high_open else ']'}")
        raise ConfigError(f"{where} must be a number {bound}{why}, got {value!r}")
    return float(value)


def _limit_batches(where: str, value: Any, what: str) -> None:
    """Lightning's limit_*_batches: a fraction in (0, 1] or a number of batches >= 1."""
    if value is None:
        return
    if _is_int(value) and value >= 1 or _is_number(value) and 0 < value <= 1:
        return
    zero = f"; 0 would {what}" if _is_number(value) and value == 0 else ""
    raise ConfigError(f"{where} must be a fraction in (0, 1] or a number of batches >= 1"
                      f"{zero}, got {value!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def device_count(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for (None: all there are, known later)."""
    if _is_int(devices):
        return None if devices == -1 else devices
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    text = str(devices).strip()
    if text in ("auto", "-1"):
        return None
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else None


def check_trainer(trainer: DictConfig) -> None:
    """The Trainer values a run needs: whole epochs, each one trained, validated at a cadence
    that includes the last epoch (model selection picks among validated epochs), tested."""
    epochs = require_int("trainer.max_epochs", trainer.get("max_epochs"), 1,
                         why=" (the epochs to train)")
    if trainer.get("min_epochs") is not None:
        require_int("trainer.min_epochs", trainer.min_epochs, 0, epochs,
                    why=" (at most trainer.max_epochs)")
    if trainer.get("max_steps") not in (None, -1):
        raise ConfigError(f"trainer.max_steps={trainer.max_steps} would stop inside an epoch; "
                          "kdlab trains whole epochs: set trainer.max_epochs (and "
                          "trainer.limit_train_batches for shorter epochs)")
    every = require_int("trainer.check_val_every_n_epoch",
                        trainer.get("check_val_every_n_epoch", 1), 1)
    if epochs % every:
        valid = _divisors(epochs)
        shown = ", ".join(map(str, valid[:12])) + (", ..." if len(valid) > 12 else "")
        raise ConfigError(f"trainer.check_val_every_n_epoch={every} never validates the last "
                          f"of the {epochs} epochs (trainer.max_epochs), and model selection "
                          f"needs it; use a divisor of {epochs}: {shown}")
    interval = trainer.get("val_check_interval")
    if interval is not None and not (_is_number(interval) and float(interval) == 1.0):
        raise ConfigError(f"trainer.val_check_interval must be 1.0 (validation once per epoch, "
                          f"at its end: selection picks an epoch), got {interval!r}; validate "
                          "less often with trainer.check_val_every_n_epoch")
    _limit_batches("trainer.limit_train_batches", trainer.get("limit_train_batches"),
                   "train nothing")
    _limit_batches("trainer.limit_val_batches", trainer.get("limit_val_batches"),
                   "turn off validation, which model selection needs")
    _limit_batches("trainer.limit_test_batches", trainer.get("limit_test_batches"),
                   "turn off the test")
    if trainer.get("num_sanity_val_steps") is not None:
        require_int("trainer.num_sanity_val_steps", trainer.num_sanity_val_steps, -1)
    if trainer.get("log_every_n_steps") is not None:
        require_int("trainer.log_every_n_steps", trainer.log_every_n_steps, 1)
    if trainer.get("accumulate_grad_batches") is not None:
        require_int("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches, 1)
    if trainer.get("gradient_clip_val") is not None:
        require_number("trainer.gradient_clip_val", trainer.gradient_clip_val, 0,
                       why=" (null: no clipping)")
    if trainer.get("fast_dev_run") not in (None, False, 0):
        raise ConfigError("trainer.fast_dev_run writes no checkpoints, so nothing can be "
                          "selected or tested; for a quick run set trainer.max_epochs=1 "
                          "trainer.limit_train_batches=2")
    if trainer.get("enable_checkpointing") is False:
        raise ConfigError("trainer.enable_checkpointing=false: kdlab needs its checkpoints "
                          "(best.ckpt for the test, last.ckpt for resume)")
    devices = trainer.get("devices", 1)
    count = device_count(devices)
    if not (count is not None and count >= 1 or count is None and str(devices).strip() in (
            "auto", "-1")):
        raise ConfigError(f"trainer.devices must be a number of devices >= 1, -1 or auto (all "
                          f"of them), or a list of device ids, got {devices!r}")
    require_int("trainer.num_nodes", trainer.get("num_nodes", 1), 1)


RECIPE_NUMBERS = {  # dataset.recipe key: (low, high, low_open, high_open)
    "lr": (0.0, None, True, False),
    "momentum": (0.0, 1.0, False, True),
    "weight_decay": (0.0, None, False, False),
    "gamma": (0.0, 1.0, True, False),
}


def check_dataset(dataset: DictConfig) -> None:
    """The dataset values a datamodule does not check itself (it checks batch_size and the
    meta/val fractions), and the recipe (the student's defaults, the teachers' training)."""
    if dataset.get("eval_batch_size") is not None:
        require_int("dataset.eval_batch_size", dataset.eval_batch_size, 1,
                    why=" (null: max(256, batch_size))")
    if dataset.get("test_fraction") is not None:
        require_number("dataset.test_fraction", dataset.test_fraction, 0, 1, low_open=True,
                       high_open=True)
    for key, low in (("num_workers", 0), ("split_seed", 0)):
        if dataset.get(key) is not None:
            require_int(f"dataset.{key}", dataset[key], low)
    recipe = dataset.get("recipe") or {}
    if "max_epochs" not in recipe:
        return
    epochs = require_int("dataset.recipe.max_epochs", recipe.get("max_epochs"), 1)
    for key, (low, high, low_open, high_open) in RECIPE_NUMBERS.items():
        if recipe.get(key) is not None:
            require_number(f"dataset.recipe.{key}", recipe[key], low, high, low_open, high_open)
    milestones = recipe.get("milestones") or []
    if not isinstance(milestones, (list, ListConfig)):
        raise ConfigError(f"dataset.recipe.milestones must be a list of epochs, got "
                          f"{milestones!r}")
    for m in milestones:
        require_int("dataset.recipe.milestones", m, 1, epochs,
                    why=" each (epochs of dataset.recipe.max_epochs)")


def check_optimizer(optimizer: DictConfig) -> None:
    if "lr" in optimizer:
        require_number("optimizer.lr", optimizer.lr, 0, low_open=True)
    if optimizer.get("momentum") is not None:
        require_number("optimizer.momentum", optimizer.momentum, 0, 1, high_open=True)
    if optimizer.get("weight_decay") is not None:
        require_number("optimizer.weight_decay", optimizer.weight_decay, 0)


def check_numbers(cfg: DictConfig) -> None:
    """Every number of the trainer, dataset and optimiser nodes that a run could not use,
    refused before anything runs."""
    check_dataset(cfg.dataset)  # first: trainer.max_epochs is the recipe's by default
    check_trainer(cfg.trainer)
    check_optimizer(cfg.optimizer)


def check_selection(cfg: DictConfig, num_classes: int) -> None:
    """The selection rule, and that the val metrics it names are logged for this data."""
    rule = selection_rule(cfg)
    logged = [f"val/{name}" for name in classification_metrics(num_classes)]
    missing = [m for m in (rule.metric, *rule.tie_break) if m.startswith("val/")
               and m not in logged]
    if missing:
        raise ConfigError(f"selection uses {missing[0]}, which is not logged for "
                          f"{num_classes} classes (top-5 needs more than 5); use one of "
                          f"{', '.join(logged)}")


def check_teacher(where: str, options: dict[str, Any]) -> None:
    label_noise = str(options.get("label_noise") or "same")
    if label_noise not in LABEL_NOISE:
        raise ConfigError(f"{where}.label_noise must be one of {', '.join(LABEL_NOISE)}, "
                          f"got {label_noise!r}")
    if options.get("max_epochs") is not None:
        require_int(f"{where}.max_epochs", options["max_epochs"], 1)
    if options.get("lr") is not None:
        require_number(f"{where}.lr", options["lr"], 0, low_open=True)
    if options.get("weight_decay") is not None:
        require_number(f"{where}.weight_decay", options["weight_decay"], 0)
    ckpt = str(options.get("ckpt") or "auto")
    if ckpt != "auto" and not ckpt.startswith("tv:") and not Path(ckpt).expanduser().is_file():
        raise ConfigError(f"teacher checkpoint not found: {ckpt}; give an existing file with "
                          f"{where}.ckpt=PATH, or {where}.ckpt=auto to train the teacher first")


def validate(cfg: DictConfig) -> None:
    """Raise a one-line :class:`ConfigError` if ``cfg`` cannot run; create nothing."""
    for where, node in nodes_with_target(cfg):
        top = where.split(".")[0].split("[")[0]
        ignore = TEACHER_OPTIONS if top in ("teacher", "teachers") else ()
        ignore += ("recipe",) if where == "dataset" else ()
        check_signature(where or "config", node, ignore)
    check_noise(cfg.noise)
    check_numbers(cfg)
    mode = str(cfg.get("teacher_cache", "auto"))
    if mode not in TEACHER_CACHE_MODES:
        raise ConfigError(f"teacher_cache must be one of {', '.join(TEACHER_CACHE_MODES)}, "
                          f"got {mode!r}")
    strategy = str(cfg.trainer.get("strategy", "auto"))
    if "spawn" in strategy:  # spawned ranks would keep the test-time results to themselves
        raise ConfigError(f"trainer.strategy={strategy} is not supported; use trainer=ddp "
                          "(trainer.strategy=ddp)")
    dm = instantiate_datamodule(cfg)
    dm.check()
    if mode == "views" and not dm.augmentation_views:
        raise ConfigError(f"teacher_cache=views caches the teachers' logits for every view of "
                          f"an enumerable augmentation (CIFAR's crop + flip); {dm.name} has "
                          "none here: use teacher_cache=memory or disk")
    method = instantiate_method(cfg.method)
    dm.check_views(tuple(method.input_views))
    if int(cfg.get("generations") or 1) < 1:
        raise ConfigError(f"generations must be >= 1, got {cfg.generations}")
    if int(cfg.get("generations") or 1) > 1 and not method.needs_teacher:
        raise ConfigError(f"generations={cfg.generations} distils each generation from the "
                          f"previous one, but method {method.name} takes no teacher")
    check_models(cfg, method, dm.num_classes, tuple(dm.input_shape))
    check_selection(cfg, dm.num_classes)
    check_wandb(cfg)


def check_models(cfg: DictConfig, method: Method, num_classes: int, input_shape: tuple[int, ...]
                 ) -> None:
    """Student and teacher architectures build for this data, and the method applies."""
    student = build_model(cfg.student, num_classes, input_shape, where="student")
    teachers = []
    if method.needs_teacher:
        for spec in teacher_specs(cfg):
            check_teacher(spec.where, spec.options)
            check_signature(spec.where, spec.arch)
            teachers.append(build_model(spec.arch, num_classes, input_shape, where=spec.where))
            if spec.ckpt == "auto":  # its own run: checked now, not once the student's began
                try:
                    check_numbers(training_config(cfg, spec))
                except ConfigError as e:
                    raise ConfigError(f"the auto-trained {spec.where} ({spec.name}, "
                                      f"trained first on the dataset recipe): {e}") from None
    method.check(student, teachers)
