"""The ``kdlab`` console script.

usage: kdlab COMMAND [ARGS...]

  kdlab train [OVERRIDES...]       train + evaluate one run (a Hydra app; -m for sweeps).
                                   Prints its plan first (teacher to train or load, epochs,
                                   schedule) and an estimate of the whole run after epoch 1
  kdlab train --help               config groups and their options
  kdlab eval RUN_DIR_OR_CKPT [key=value ...]
                                   evaluate a trained student without training: the run's
                                   metrics and a reliability diagram, on its own data or
                                   dataset=NAME (kdlab eval --help)
  kdlab report PATH... [--by KEYS] [--metric NAMES] [--out DIR] [--html]
                                   mean +/- std tables and plots over run directories;
                                   --html: one self-contained page
  kdlab methods [--config-dir D]   the distillation methods, one line each

examples:
  kdlab train                                  # digits: cnn_small <- cnn, KD
  kdlab train method=alm_kd dataset=cifar100   # resnet8x4 <- resnet32x4 on the CIFAR recipe
  kdlab train -m method=ce,kd seed=0,1,2       # a sweep
  kdlab eval outputs/2026-11-23/18-25-14-kd dataset=cifar10
  kdlab report multirun/2026-11-23/19-00-00 --html
  python scripts/reproduce_cifar100.py --dry-run   # the README's CIFAR-100 table on a GPU

Your own methods, models and datamodules: YAMLs with `_target_: my_package.Thing` in a
config directory of yours (method/, student/, teacher/, dataset/ ...), given with
--config-dir DIR (or hydra.searchpath=[file://DIR]); the current directory is importable.
See docs/extending.md.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError, KdlabError

USAGE = __doc__.split("\n\n", 1)[1]  # from "usage:" on
# Hydra's own flags that take a value, and those that make it do something else than run.
VALUE_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn",
               "--experimental-rerun")
OTHER_MODES = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--resolve",
               "--package", "-p", "--shell-completion", "-sc", "--version")
MULTIRUN = ("-m", "--multirun")


@hydra.main(version_base="1.3", config_path="pkg://kdlab.conf", config_name="train")
def train_app(cfg: DictConfig) -> float:
    from .config import check_added_keys

    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    try:
        check_added_keys(cfg, list(hc.overrides.task))
        check_launcher_strategy(cfg, hc, output_dir)
        print_plan(cfg)
        from .train import run  # heavy imports (lightning) only once Hydra has parsed the args

        results = run(cfg, output_dir)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job; the sweep goes on
        fail(e, output_dir)
    return float(results["val"]["acc"])


def print_plan(cfg: DictConfig) -> None:
    """What the run will do (teachers, student, epochs, schedule): rank 0, into train.log."""
    import logging

    from .plan import describe_plan
    from .run_dir import is_launching_process

    if is_launching_process():
        logging.getLogger("kdlab").info(describe_plan(cfg))


def fail(error: BaseException, output_dir: Path | None = None) -> None:
    """One line on stderr and exit 1; unexpected errors keep their traceback in error.log."""
    if isinstance(error, KdlabError):
        message = str(error)
    else:
        where = ""
        if output_dir is not None and output_dir.is_dir():
            import traceback

            log = output_dir / "error.log"
            log.write_text("".join(traceback.format_exception(error)))
            where = f"; traceback in {log}"
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        message = f"unexpected {type(error).__name__}: {first}{where}"
    print(f"kdlab: error: {message}", file=sys.stderr)
    raise SystemExit(1) from None


# -- checks before Hydra creates anything --------------------------------------------------


def split_arguments(args: list[str]) -> tuple[list[str], list[str], bool, bool]:
    """(overrides, extra config dirs, multirun, another Hydra mode such as --help)."""
    overrides, config_dirs = [], []
    multirun = other = False
    i = 0
    while i < len(args):
        arg = args[i]
        flag, eq, value = arg.partition("=")
        if flag in VALUE_FLAGS:
            if not eq:
                i += 1
                value = args[i] if i < len(args) else ""
            if flag in ("--config-dir", "-cd"):
                config_dirs.append(value)
            elif flag not in ("--config-dir", "-cd"):
                other = True  # another primary config: let Hydra handle it
        elif arg in MULTIRUN:
            multirun = True
        elif arg.startswith("-"):
            other = True
        else:
            overrides.append(arg)
        i += 1
    return overrides, config_dirs, multirun, other


def hydra_error_line(error: Exception) -> str:
    """Hydra's multi-line composition errors as one line naming the problem and the fix."""
    text = str(error)
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, name = missing.groups()
        section = text.split("Available options", 1)[-1].split("Config search path")[0]
        options = re.findall(r"^\t(\S+)$", section, flags=re.M)
        return f"unknown {group} {name!r}; available: {', '.join(options)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return "; ".join(line.rstrip(".") for line in lines[:2])


def check_overrides(args: list[str]) -> None:
    """Compose and validate a single run's config up front, so that bad input fails in one
    line before Hydra writes anything."""
    overrides, config_dirs, multirun, other = split_arguments(args)
    if multirun or other:
        return  # sweeps: each job is validated before it starts; --help etc.: Hydra's
    from .config import compose, validate
    from .run_dir import finished_run_error

    for arg in overrides:  # Hydra writes .hydra/ into the run directory: check it first
        if arg.startswith("hydra.run.dir="):
            finished = finished_run_error(Path(arg.split("=", 1)[1].strip("'\"")))
            if finished:
                fail(finished)
    try:
        cfg = compose(overrides, config_dirs)
    except KdlabError as e:
        fail(e)
    except Exception as e:
        fail(ConfigError(hydra_error_line(e)))
    try:
        validate(cfg)
    except KdlabError as e:
        fail(e)


# Sweep launchers and the multi-process strategies they can host (measured: DESIGN.md).
LAUNCHERS = {"JoblibLauncher": "joblib", "LocalLauncher": "submitit_local"}


def launcher_strategy_error(trainer: DictConfig, hydra_cfg: DictConfig) -> str | None:
    """Why this sweep job's DDP setting cannot run under its launcher (None: it can).

    DDP re-launches the script once per rank, which a joblib worker or a submitit_local job
    cannot do (kdlab does not support ddp_spawn). On SLURM ddp runs one task per device:
    hydra.launcher.tasks_per_node must equal trainer.devices.
    """
    strategy, devices = str(trainer.get("strategy", "auto")), trainer.get("devices", 1)
    multi_process = strategy.startswith(("ddp", "fsdp", "deepspeed")) or (
        strategy == "auto" and isinstance(devices, int) and devices > 1)
    if hydra_cfg.mode != RunMode.MULTIRUN or not multi_process:
        return None
    launcher = str(hydra_cfg.launcher.get("_target_", "")).rsplit(".", 1)[-1]
    if launcher in LAUNCHERS:
        return (f"trainer.strategy={strategy} (devices={devices}) cannot run in a sweep job "
                f"under hydra/launcher={LAUNCHERS[launcher]}. Sweep single-device jobs "
                "(trainer.devices=1 trainer.strategy=auto), or run the DDP job on its own "
                "without -m.")
    tasks = hydra_cfg.launcher.get("tasks_per_node")
    if launcher == "SlurmLauncher" and strategy != "ddp_spawn" and tasks != devices:
        return (f"trainer.strategy={strategy} on SLURM runs one task per device: set "
                f"hydra.launcher.tasks_per_node={devices} and gpus_per_node={devices} "
                f"(now tasks_per_node={tasks}) to match trainer.devices={devices}.")
    return None


def check_launcher_strategy(cfg: DictConfig, hc: DictConfig, output_dir: Path) -> None:
    """Stop a sweep job whose DDP setting its launcher cannot run, with a clear error."""
    error = launcher_strategy_error(cfg.trainer, hc)
    if error is None:
        return
    from .io import atomic_write_json

    atomic_write_json(output_dir / "failed.json", {"status": "failed",
                                                   "error": f"ConfigError: {error}"})
    raise ConfigError(error)


# -- kdlab methods -------------------------------------------------------------------------


def list_methods(config_dirs: list[str] = ()) -> str:
    """Every method config (kdlab's and those in ``config_dirs``) with its description."""
    from .config import conf_dir, import_target

    found: dict[str, Path] = {}
    for root in [conf_dir(), *map(Path, config_dirs)]:
        for path in sorted((root / "method").glob("*.yaml")):
            found[path.stem] = path  # a user's config of the same name wins, as in Hydra
    lines, width = [], max(map(len, found), default=0)
    for name, path in sorted(found.items()):
        config = OmegaConf.load(path)
        target = str(config.get("_target_", ""))
        try:
            description = import_target(target, f"method {name}").describe(config)
        except KdlabError as e:
            description = f"(cannot import: {e})"
        origin = "" if path.parent.parent == conf_dir() else f"  [{path}]"
        lines.append(f"  {name:<{width}}  {description}{origin}")
    return "methods (kdlab train method=NAME):\n" + "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # like `python -m`: your package in . imports
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "methods":
        _, config_dirs, _, _ = split_arguments(rest)
        print(list_methods(config_dirs))
        return
    if command == "report":
        from .report import main as report_main

        report_main(rest)
        return
    if command == "eval":
        from .evaluate import main as eval_main

        eval_main(rest)
        return
    if command != "train":
        if "=" in command or command.startswith("-"):
            rest = args  # `kdlab key=value ...` (how DDP re-launches ranks) means train
        else:
            print(f"kdlab: error: unknown command {command!r}; commands: train, eval, report, "
                  "methods", file=sys.stderr)
            raise SystemExit(2)
    check_overrides(rest)
    sys.argv = [sys.argv[0], *rest]
    train_app()


if __name__ == "__main__":
    main()
