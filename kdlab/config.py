"""Config plumbing: where conf/ lives, the ``student``/``teacher`` groups, composition.

``conf/model/*.yaml`` are the architectures. The ``student`` and ``teacher`` groups are
registered from them at start-up, so ``student=resnet8x4 teacher=resnet32x4`` use the same
names and no architecture is written down twice.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

CONFIG_MODULE = "kdlab.conf"


def conf_dir() -> Path:
    return Path(str(resources.files(CONFIG_MODULE)))


def register_model_groups() -> None:
    cs = ConfigStore.instance()
    for path in sorted((conf_dir() / "model").glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="student", name=path.stem, node=node, provider="kdlab")
        cs.store(group="teacher", name=path.stem, node=node, provider="kdlab")


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """Compose the config outside a Hydra app (tests, notebooks); with hydra.* resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_model_groups()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name, overrides=list(overrides or []),
                             return_hydra_config=False)


def finished_run_error(output_dir: Path) -> ConfigError | None:
    """A finished run directory is never written into again."""
    if (Path(output_dir) / "results.json").exists():
        return ConfigError(f"{output_dir} already holds a finished run (results.json); choose "
                           "another directory with hydra.run.dir=... or delete it")
    return None


def model_kwargs(spec: DictConfig) -> dict:
    """Constructor kwargs of an architecture node (everything but bookkeeping keys)."""
    data = OmegaConf.to_container(spec, resolve=True)
    for key in ("name", "ckpt", "allow_pickle", "lr"):
        data.pop(key, None)
    return data
