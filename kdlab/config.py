"""Config plumbing: where conf/ lives, composition outside a Hydra app, and validation.

:func:`validate` decides, before anything is created, whether a composed config can run:
every ``_target_`` node's keys are checked against its callable's signature (with a
"did you mean" for typos), values against their ranges, files that must exist, and the
logger set-up. The CLI runs it before Hydra makes the run directory; :func:`kdlab.train.run`
runs it again for configs composed in scripts and notebooks.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import os
import re
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .errors import ConfigError, KdlabError

CONFIG_MODULE = "kdlab.conf"
# Keys of a `_target_` node that Hydra reads itself.
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# Keys of a teacher node (`teacher` and the entries of `teachers`) that say how to get the
# teacher, not what its architecture is.
TEACHER_OPTIONS = ("model", "ckpt", "allow_pickle", "label_noise", "max_epochs", "lr",
                   "weight_decay")
LABEL_NOISE = ("same", "none")
TEACHER_CACHE_MODES = ("auto", "memory", "disk", "views", "off")
CHOICE_GROUPS = ("dataset", "student", "teacher", "method", "noise")
# Config nodes that take new keys of the user's (`+callbacks.NAME={_target_: ...}`).
FREE_KEY_NODES = ("callbacks", "logger")


def conf_dir() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


@functools.cache
def not_the_experiment() -> tuple[str, ...]:
    """Config keys that do not change what a run computes (``resume``, ``logger``, threads,
    machine paths, ...): conf/train.yaml's ``hydra.job.config.override_dirname.exclude_keys``,
    the one list that keeps them out of sweep job directory names, out of ``kdlab report``'s
    grouping and out of resume's same-config check."""
    train = OmegaConf.load(conf_dir() / "train.yaml")
    return tuple(train.hydra.job.config.override_dirname.exclude_keys)


def changes_the_experiment(key: str) -> bool:
    """False for a key of :func:`not_the_experiment` or below one (``logger.wandb.tags``)."""
    key = key.lstrip("+~")
    return not any(key == k or key.startswith(f"{k}.") for k in not_the_experiment())


def compose(overrides: list[str] | None = None, config_dirs: list[str | Path] = (),
            config_name: str = "train", keep_hydra: bool = False) -> DictConfig:
    """The config ``kdlab train OVERRIDES`` would run, composed outside a Hydra app.

    ``config_dirs`` are extra config directories (like ``--config-dir``), searched before
    kdlab's own. ``choices`` holds the option names; ``+key`` overrides are checked.
    ``keep_hydra``: keep Hydra's own settings under ``hydra`` (unresolved).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    overrides = list(overrides or [])
    if config_dirs:  # like --config-dir: searched before kdlab's own (with any searchpath)
        given = [o for o in overrides if o.startswith("hydra.searchpath=")]
        overrides = [o for o in overrides if o not in given]
        paths = [f"file://{Path(d).resolve()}" for d in config_dirs]
        for o in given:
            paths += [p.strip() for p in o.split("=", 1)[1].strip("[]").split(",") if p.strip()]
        overrides.append(f"hydra.searchpath=[{','.join(paths)}]")
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        try:
            cfg = hydra_compose(config_name, overrides=overrides, return_hydra_config=True)
        except Exception as e:
            unknown = re.search(r"Could not override '([^']+)'", str(e))
            if not (unknown and "To append to your config use" in str(e)):
                raise
            key = unknown.group(1)
            rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != key]
            base = hydra_compose(config_name, overrides=rest, return_hydra_config=False)
            parent_key = key.rpartition(".")[0]
            raise unknown_key_error(key, OmegaConf.select(base, parent_key) if parent_key
                                    else base) from None
    choices = cfg.hydra.runtime.choices
    with open_dict(cfg):
        cfg.choices = {g: choices.get(g) for g in CHOICE_GROUPS}
        if not keep_hydra:
            del cfg["hydra"]
    check_added_keys(cfg, overrides)
    return cfg


def open_dict(cfg: DictConfig):
    from omegaconf import open_dict as _open_dict

    return _open_dict(cfg)


# -- keys ----------------------------------------------------------------------------------


def suggest(key: str, candidates: list[str]) -> str:
    """``"; did you mean X?"`` for the closest candidate key, or ``""``.

    Compares the last dotted part: an abbreviation by initials (``learning_rate`` -> ``lr``),
    then a prefix (``max_epoch`` -> ``max_epochs``), then string similarity.
    """
    parent, _, name = key.lower().rpartition(".")
    siblings = [c for c in candidates if c.lower().rpartition(".")[0] == parent]
    last = {c.rsplit(".", 1)[-1].lower(): c for c in siblings or candidates}
    initials = "".join(w[0] for w in name.split("_") if w)
    for short, full in last.items():
        if len(name.split("_")) > 1 and short == initials:
            return f"; did you mean {full}?"
    for short, full in last.items():
        if short.startswith(name) or name.startswith(short) and len(short) > 3:
            return f"; did you mean {full}?"
    close = difflib.get_close_matches(name, list(last), n=1, cutoff=0.6)
    return f"; did you mean {last[close[0]]}?" if close else ""


def unknown_key_error(key: str, parent: Any) -> ConfigError:
    """``unknown key a.b; did you mean a.c?`` from the keys the ``parent`` node of ``key``
    has, or takes (a ``_target_``'s parameters)."""
    parent_key = key.rpartition(".")[0]
    names = [str(n) for n in parent] if isinstance(parent, DictConfig) else []
    target = ""
    if isinstance(parent, DictConfig) and "_target_" in parent:
        target = str(parent._target_)
        names += accepted_keys(import_target(target, parent_key)) or []
    candidates = [f"{parent_key}.{n}" if parent_key else n for n in dict.fromkeys(names)
                  if not n.startswith("_") and n != key.rsplit(".", 1)[-1]]
    hint = suggest(key, candidates)
    if not hint:
        takes = [c.rsplit(".", 1)[-1] for c in candidates]
        hint = (f" ({target or parent_key or 'the config'} takes: {', '.join(takes[:12])}"
                f"{', ...' if len(takes) > 12 else ''})" if takes else ": kdlab does not read it")
    return ConfigError(f"unknown key {key}{hint}")


def check_added_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """``+a.b.key=value`` adds a key: only under a ``_target_`` node (whose signature is
    checked by :func:`validate`), never a key kdlab would silently ignore."""
    for override in overrides:
        if not override.startswith("+") or override.startswith("++"):
            continue
        key = override.lstrip("+").split("=", 1)[0]
        if key.startswith("hydra") or "@" in key:
            continue
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if (isinstance(parent, DictConfig) and "_target_" in parent) or \
                parent_key in FREE_KEY_NODES:
            continue
        raise unknown_key_error(key, parent)


def _nodes_with_target(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for key in node:
            if path == "" and key == "hydra":
                continue
            yield from _nodes_with_target(node._get_node(key), f"{path}.{key}".lstrip("."))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _nodes_with_target(item, f"{path}[{i}]")


def import_target(target: str, where: str):
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        hint = ("; is its package installed or on PYTHONPATH (the current directory is)?"
                if isinstance(e, ImportError) else "")
        raise ConfigError(f"{where}._target_: cannot import {target} "
                          f"({type(e).__name__}: {e}){hint}") from None


def accepted_keys(target: Any) -> list[str] | None:
    """The keyword names ``target`` accepts, or None when it takes any (``**kwargs``).

    For a class whose ``__init__`` passes ``**kwargs`` on, the parents' names count too.
    """
    owners = [c for c in inspect.getmro(target) if "__init__" in vars(c)] \
        if inspect.isclass(target) else [target]
    names: list[str] = []
    for owner in owners:
        try:
            params = inspect.signature(owner.__init__ if inspect.isclass(owner) else owner
                                       ).parameters
        except (TypeError, ValueError):
            return None  # a builtin without an inspectable signature
        names += [n for n, p in params.items()
                  if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"]
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            return names
    return None


def check_signature(where: str, node: DictConfig, ignore: tuple[str, ...] = ()) -> None:
    """Every key of a ``_target_`` node must be a parameter of the callable."""
    known = accepted_keys(import_target(node._target_, where))
    if known is None:
        return
    for key in node:
        if key not in HYDRA_KEYS and key not in ignore and key not in known:
            raise unknown_key_error(f"{where}.{key}", node)


# -- values --------------------------------------------------------------------------------


def check_noise(noise: DictConfig) -> None:
    from .data.noise import check_noise as check

    check(str(noise.get("type", "none")), noise.get("rate", 0.0))
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
    from .metrics import classification_metrics
    from .selection import selection_rule

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


def check_wandb(cfg: DictConfig) -> None:
    """A wandb logger needs the package and, unless offline or disabled, an API key, which
    never comes from a config (it would end up in config.yaml and the wandb run)."""
    nodes = [(k, n) for k, n in (cfg.get("logger") or {}).items()
             if str(n.get("_target_", "")).endswith("WandbLogger")]
    if not nodes:
        return
    from .loggers import SECRET_KEYS

    for name, node in nodes:
        secrets = [k for k in node if str(k).lower() in SECRET_KEYS]
        if secrets:
            raise ConfigError(f"logger.{name}.{secrets[0]}: never put a W&B key into a config;"
                              " set WANDB_API_KEY in the environment or run `wandb login`")
    try:
        import wandb  # noqa: F401
    except ModuleNotFoundError:
        raise ConfigError("logger=wandb needs the wandb package: pip install wandb") from None
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    if _wandb_logged_in():
        return
    raise ConfigError("logger=wandb has no W&B API key: run `wandb login`, set WANDB_API_KEY, "
                      "or log without network with WANDB_MODE=offline (upload later with "
                      "`wandb sync`)")


def _wandb_logged_in() -> bool:
    import netrc

    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def validate(cfg: DictConfig) -> None:
    """Raise a one-line :class:`ConfigError` if ``cfg`` cannot run; create nothing."""
    for where, node in _nodes_with_target(cfg):
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


def check_models(cfg: DictConfig, method, num_classes: int, input_shape: tuple[int, ...]
                 ) -> None:
    """Student and teacher architectures build for this data, and the method applies."""
    from .models import build_model
    from .teachers import teacher_specs, training_config

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


def instantiate_datamodule(cfg: DictConfig):
    """The run's datamodule (not set up: no data read yet)."""
    from hydra.utils import instantiate

    noise = OmegaConf.to_container(cfg.noise, resolve=True)
    try:
        return instantiate(cfg.dataset, noise=noise, seed=int(cfg.seed), _convert_="all")
    except Exception as e:
        raise unwrap_error(e, "dataset") from None


def instantiate_method(node: Any):
    """The method of a ``method`` config node (a DictConfig or a plain dict)."""
    from hydra.utils import instantiate

    from .methods.base import Method

    try:
        method = instantiate(node, _convert_="all")
    except Exception as e:
        raise unwrap_error(e, "method") from None
    if not isinstance(method, Method):
        raise ConfigError(f"method._target_ {node['_target_']} is not a kdlab Method "
                          "(subclass kdlab.methods.base.Method)")
    return method


def unwrap_error(e: BaseException, group: str) -> KdlabError:
    """Hydra's instantiate wraps constructor errors: return ours, or name the bad value."""
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for cause in chain:
        if isinstance(cause, KdlabError):
            return cause
    root = chain[-1]
    first = str(root).strip().splitlines()[0] if str(root).strip() else ""
    return ConfigError(f"invalid {group} settings ({type(root).__name__}: {first}); "
                       f"check the {group.split()[0]}.* overrides against `kdlab train --help`")
