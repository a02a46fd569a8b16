"""The ``kdlab`` console script.

    kdlab train [OVERRIDES...]      train + evaluate one run (Hydra app; -m for sweeps)
    kdlab train --help              config groups and their options
    kdlab methods                   the distillation methods, one line each
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from .config import conf_dir, register_model_groups
from .errors import KdlabError

USAGE = __doc__


@hydra.main(version_base="1.3", config_path="pkg://kdlab.conf", config_name="train")
def train_app(cfg: DictConfig) -> float:
    from .train import run  # heavy imports (lightning) only once Hydra has parsed the args

    hc = HydraConfig.get()
    try:
        results = run(cfg, Path(hc.runtime.output_dir))
    except KdlabError as e:
        if hc.mode == RunMode.MULTIRUN:
            raise  # Hydra records the failed job; the sweep goes on
        print(f"kdlab: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    return float(results["val"]["acc"])


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
    if command != "train":
        if "=" in command or command.startswith("-"):
            rest = args  # `kdlab key=value ...` (how DDP re-launches ranks) means train
        else:
            print(f"kdlab: error: unknown command {command!r}; commands: train, methods",
                  file=sys.stderr)
            raise SystemExit(2)
    sys.argv = [sys.argv[0], *rest]
    register_model_groups()
    train_app()


if __name__ == "__main__":
    main()
