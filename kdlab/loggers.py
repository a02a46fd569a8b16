"""Experiment loggers: built from the ``logger`` config group, finalised after the run.

Each entry of ``cfg.logger`` is one Lightning logger (``csv``, ``tensorboard``, ``wandb``);
several at once with ``logger=[csv,tensorboard,wandb]``. Lightning sends every ``self.log``
call (each loss term, every metric) to all of them. What only exists once the run is over
goes out in :func:`finalize_loggers`:

- wandb: the PNG plots of the run directory (reliability diagram, method plots such as
  ALM-KD's mixing weights) as images, ``results.json`` as the run summary; then the run is
  finished, so the next job of a sweep in the same process starts a fresh one.
- tensorboard: the same plots as images, the flattened config as hparams with the final
  test numbers as their metrics.
- csv: nothing extra. The CSV log (``<run dir>/logs/metrics.csv``, read by ``kdlab report``)
  is always written: other loggers add to it.

wandb naming: ``project`` from the config; ``group`` = the config value, else the multirun's
sweep directory (one group per sweep), else none; ``name`` = the config value, else the
job's overrides plus the seed (``method=kd,noise.rate=0.4,seed=1``), else the run directory's
name (outside a Hydra app, e.g. ``compose()`` in tests). The composed config is the wandb run
config. The API key is never read from or written to a config: wandb takes it from the
environment (``WANDB_API_KEY``) or ``wandb login``.
"""

from __future__ import annotations

import logging
import netrc
import os
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

log = logging.getLogger("kdlab")

EXTRAS = {"WandbLogger": "wandb", "TensorBoardLogger": "tensorboard"}  # pyproject extras
# Keys that would put a secret into the config (and from there into config.yaml and wandb).
SECRET_KEYS = ("api_key", "key", "token", "password", "secret")
# results.json fields that become the tensorboard hparams metrics (hparams/<split>_<metric>).
HPARAM_METRICS = (("test", "acc"), ("test", "ece"), ("test_last", "acc"), ("test_last", "ece"),
                  ("val", "acc"))


CSV_LOGGER = {"_target_": "pytorch_lightning.loggers.CSVLogger", "name": "logs", "version": ""}


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Lightning prints through its own handler: no second copy through Hydra's root
    logger, no adverts; and no warnings that do not apply to kdlab's data path."""
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning.fabric",
                 "lightning_fabric"):
        logger = logging.getLogger(name)
        logger.propagate = False
        for handler in logger.handlers:
            handler.addFilter(_DropAdverts())
    # Batches are cut from in-memory tensors in the main process: workers would only add cost.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*treespec.*")
    # Epoch metrics are torchmetrics objects computed (and synced over ranks) before logging.
    warnings.filterwarnings("ignore", message="It is recommended to use `self.log")
    # kdlab logs per-epoch metrics; a short epoch is fine.
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # kdlab decides which run directories may be written into (kdlab.run_dir).
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")


def write_to_log_files(text: str) -> None:
    """``text`` into the log files of the process (a Hydra run's ``train.log``) without a
    second copy on the console (for what is printed there already)."""
    record = logging.LogRecord("kdlab", logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def build_loggers(cfg: DictConfig, output_dir: Path) -> list:
    """One Lightning logger per entry of ``cfg.logger`` (tensorboard, wandb, ...), always
    with the CSV log."""
    nodes = list((cfg.logger or {}).values())
    if not any(str(n.get("_target_", "")).endswith("CSVLogger") for n in nodes):
        nodes.insert(0, OmegaConf.create(CSV_LOGGER))
    loggers = []
    for node in nodes:
        kwargs = OmegaConf.to_container(node, resolve=True)
        target = kwargs.pop("_target_")
        kwargs["save_dir"] = str(output_dir)
        if _is_wandb(target):
            kwargs = _wandb_kwargs(kwargs, cfg, Path(output_dir))
            _finish_stale_wandb_run()
        try:
            loggers.append(_integer_epochs(get_class(target)(**kwargs)))
        except ModuleNotFoundError as e:
            extra = EXTRAS.get(target.rsplit(".", 1)[-1])
            hint = f": pip install 'kdlab[{extra}]'" if extra else ""
            raise ConfigError(f"{target} needs a package that is not installed ({e})"
                              f"{hint}") from None
    return loggers


def _integer_epochs(logger):
    """The module logs ``epoch`` (counted from 1) with its values, and Lightning hands every
    logged value over as a float: the logger gets the integer it is (``3``, not ``3.0``)."""
    log_metrics = logger.log_metrics

    def log_with_integer_epoch(metrics: dict[str, Any], step: int | None = None) -> None:
        epoch = metrics.get("epoch")
        if isinstance(epoch, float) and epoch.is_integer():
            metrics = {**metrics, "epoch": int(epoch)}
        log_metrics(metrics, step)

    logger.log_metrics = log_with_integer_epoch
    return logger


def finalize_loggers(loggers: list, cfg: DictConfig, results: dict[str, Any],
                     output_dir: Path) -> None:
    """Hand the finished run's results and plots to loggers that can show them."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    plots = sorted(Path(output_dir).glob("*.png"))
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            _finalize_wandb(logger, results, plots)
        elif isinstance(logger, TensorBoardLogger):
            _finalize_tensorboard(logger, cfg, results, plots)
        logger.finalize("success")
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def close_loggers(loggers: list, status: str = "failed") -> None:
    """For a run that stopped early: close what is open, marking a wandb run as failed."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in loggers:
        logger.finalize(status)
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger._experiment.finish(exit_code=1)


# -- wandb -------------------------------------------------------------------------------------


def _is_wandb(target: str) -> bool:
    return target.rsplit(".", 1)[-1] == "WandbLogger"


def check_wandb(cfg: DictConfig) -> None:
    """A wandb logger needs the package and, unless offline or disabled, an API key, which
    never comes from a config (it would end up in config.yaml and the wandb run)."""
    nodes = [(k, n) for k, n in (cfg.get("logger") or {}).items()
             if str(n.get("_target_", "")).endswith("WandbLogger")]
    if not nodes:
        return
    for name, node in nodes:
        secrets = [k for k in node if str(k).lower() in SECRET_KEYS]
        if secrets:
            raise ConfigError(f"logger.{name}.{secrets[0]}: never put a W&B key into a config;"
                              " set WANDB_API_KEY in the environment or run `wandb login`")
    try:
        import wandb  # noqa: F401  (optional: the `wandb` extra)
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
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(
            os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1])
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(auth and auth[2])


def _wandb_kwargs(kwargs: dict[str, Any], cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    group, name = wandb_group_and_name(cfg, output_dir)
    kwargs["group"] = kwargs.get("group") or group
    kwargs["name"] = kwargs.get("name") or name
    kwargs["config"] = OmegaConf.to_container(cfg, resolve=True)
    return kwargs


def wandb_group_and_name(cfg: DictConfig, output_dir: Path) -> tuple[str | None, str]:
    """Defaults for wandb ``group`` and ``name``: the sweep, and the job's own overrides."""
    seed = f"seed={cfg.get('seed')}"
    hc = HydraConfig.get() if HydraConfig.initialized() else None
    job_dir = OmegaConf.select(hc, "runtime.output_dir", default=None,
                               throw_on_missing=False) if hc is not None else None
    if job_dir is None or Path(job_dir).resolve() != Path(output_dir).resolve():
        # not the Hydra job of this run (compose() in a script, or an earlier app's leftover)
        return None, f"{output_dir.name},{seed}"
    group = None
    if hc.mode == RunMode.MULTIRUN:
        group = sweep_name(str(hc.sweep.dir))
    parts = hc.job.override_dirname.split(",") if hc.job.override_dirname else []
    method = hc.runtime.choices.get("method")
    if method and not any(p.startswith("method=") for p in parts):
        parts.insert(0, f"method={method}")
    if not any(p.startswith("seed=") for p in parts):
        parts.append(seed)
    return group, ",".join(parts)


def sweep_name(sweep_dir: str) -> str:
    """``multirun/2026-11-24/10-00-00`` -> ``2026-11-24/10-00-00`` (date and time, unique)."""
    parts = Path(sweep_dir).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(sweep_dir)


def _finish_stale_wandb_run() -> None:
    """A job that failed earlier in this process (basic launcher sweeps) may have left its
    wandb run open; WandbLogger would silently reuse it for this job."""
    try:
        import wandb
    except ModuleNotFoundError:
        return
    if wandb.run is not None:
        log.warning("finishing a wandb run left open by an earlier job (%s)", wandb.run.name)
        wandb.run.finish(exit_code=1)


def _finalize_wandb(logger, results: dict[str, Any], plots: list[Path]) -> None:
    for png in plots:
        logger.log_image(key=f"plots/{png.stem}", images=[str(png)])
    logger.experiment.summary.update(results)


# -- tensorboard -------------------------------------------------------------------------------


def _finalize_tensorboard(logger, cfg: DictConfig, results: dict[str, Any],
                          plots: list[Path]) -> None:
    import matplotlib.image as mpimg

    writer = logger.experiment
    for png in plots:
        image = mpimg.imread(png)[..., :3]  # RGBA -> RGB, floats in [0, 1]
        writer.add_image(f"plots/{png.stem}", image, global_step=0, dataformats="HWC")
    metrics = {f"hparams/{split}_{name}": results[split][name]
               for split, name in HPARAM_METRICS if name in results.get(split, {})}
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True), metrics=metrics, step=0)
