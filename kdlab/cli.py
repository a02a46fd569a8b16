"""The ``kdlab`` console script.

    kdlab train [OVERRIDES...]      train + evaluate one run (Hydra app; -m for sweeps)
    kdlab train --help              config groups and their options
    kdlab methods                   the distillation methods, one line each
    kdlab report PATH... [--by KEYS] [--metric NAMES] [--out DIR]
                                    mean +/- std tables and plots over run directories
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import conf_dir, finished_run_error, register_model_groups
from .errors import ConfigError, KdlabError

USAGE = __doc__


@hydra.main(version_base="1.3", config_path="pkg://kdlab.conf", config_name="train")
def train_app(cfg: DictConfig) -> float:
    hc = HydraConfig.get()
    check_launcher_strategy(cfg, hc, Path(hc.runtime.output_dir))
    from .train import run  # heavy imports (lightning) only once Hydra has parsed the args

    output_dir = Path(hc.runtime.output_dir)
    try:
        results = run(cfg, output_dir)
    except Exception as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job; the sweep goes on
        fail(e, output_dir)
    return float(results["val"]["acc"])


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


def check_overrides(overrides: list[str]) -> None:
    """Compose a single run's config up front so a typo fails in a second, in one line."""
    if any(a.startswith("-") for a in overrides):
        return  # --help, -m, --cfg ...: Hydra's own modes
    from .config import compose

    try:
        compose([a for a in overrides if not a.lstrip("+~").startswith("hydra")])
    except Exception as e:
        print(f"kdlab: error: {hydra_error_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    # Hydra writes .hydra/ into the run directory before the run starts: check it first.
    for arg in overrides:
        if arg.startswith("hydra.run.dir="):
            finished = finished_run_error(Path(arg.split("=", 1)[1].strip("'\"")))
            if finished:
                fail(finished)


# Sweep launchers and the multi-process strategies they can host (measured: DESIGN.md).
LAUNCHERS = {"JoblibLauncher": "joblib", "LocalLauncher": "submitit_local"}


def launcher_strategy_error(trainer: DictConfig, hydra_cfg: DictConfig) -> str | None:
    """Why this sweep job's DDP setting cannot run under its launcher (None: it can).

    DDP re-launches the script once per rank, which a joblib worker or a submitit_local job
    cannot do (kdlab does not support ddp_spawn: see kdlab.train.build_trainer). On SLURM
    ddp runs one task per device: hydra.launcher.tasks_per_node must equal trainer.devices.
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


def list_methods() -> str:
    import importlib

    lines = []
    for path in sorted((conf_dir() / "method").glob("*.yaml")):
        target = OmegaConf.load(path)["_target_"]
        module, cls = target.rsplit(".", 1)
        method = getattr(importlib.import_module(module), cls)
        lines.append(f"  {path.stem:<18} {method.description}")
    return "methods (kdlab train method=NAME):\n" + "\n".join(lines)


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = args[0], args[1:]
    if command == "methods":
        print(list_methods())
        return
    if command == "report":
        from .report import main as report_main

        report_main(rest)
        return
    if command != "train":
        if "=" in command or command.startswith("-"):
            rest = args  # `kdlab key=value ...` (how DDP re-launches ranks) means train
        else:
            print(f"kdlab: error: unknown command {command!r}; commands: train, methods, report",
                  file=sys.stderr)
            raise SystemExit(2)
    register_model_groups()
    check_overrides(rest)
    sys.argv = [sys.argv[0], *rest]
    train_app()


if __name__ == "__main__":
    main()
