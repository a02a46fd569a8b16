"""The one place that assembles a run from the composed config.

datamodule, student, teacher(s), method, DistillModule, loggers and trainer are built here;
then fit, test (last epoch and best-on-val), and the run directory is completed with
``results.json``, the reliability diagram and a summary table.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .callbacks import TrainThroughput
from .config import finished_run_error, model_kwargs
from .data.base import SplitDataModule
from .errors import ConfigError, KdlabError
from .io import atomic_torch_save, atomic_write_json, atomic_write_text
from .loggers import build_loggers, close_loggers, finalize_loggers
from .methods.base import Method
from .models import build_model
from .models.loading import freeze, load_weights
from .module import DistillModule, check_teacher_cache_mode
from .plots import reliability_diagram

log = logging.getLogger("kdlab")


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _tidy_lightning_logging() -> None:
    """Lightning prints through its own handler; stop the copy through Hydra's root one."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.propagate = False
        for handler in logger.handlers:
            handler.addFilter(_DropAdverts())


_tidy_lightning_logging()
# Batches are cut from in-memory tensors in the main process: workers would only add overhead.
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*treespec.*")
# Epoch metrics are torchmetrics objects computed (and synced over ranks) before logging.
warnings.filterwarnings("ignore", message="It is recommended to use `self.log")

RESULT_METRICS = ("acc", "acc_top5", "ece", "nll", "brier")


# -- building blocks ---------------------------------------------------------------------------


def build_datamodule(cfg: DictConfig) -> SplitDataModule:
    noise = OmegaConf.to_container(cfg.noise, resolve=True)
    try:
        dm = instantiate(cfg.dataset, noise=noise, seed=cfg.seed, _convert_="all")
    except Exception as e:  # Hydra wraps constructor errors; surface ours unwrapped
        raise _unwrap(e, "dataset") from None
    dm.setup()
    return dm


def build_method(cfg: DictConfig) -> Method:
    try:
        method = instantiate(cfg.method, _convert_="all")
    except Exception as e:
        raise _unwrap(e, "method") from None
    if not isinstance(method, Method):
        raise ConfigError(f"method._target_ {cfg.method._target_} is not a kdlab Method")
    return method


def teacher_specs(cfg: DictConfig) -> list[DictConfig]:
    return list(cfg.teachers) if cfg.get("teachers") else [cfg.teacher]


def build_teachers(cfg: DictConfig, dm: SplitDataModule) -> list[torch.nn.Module]:
    teachers = []
    for spec in teacher_specs(cfg):
        model = build_model(spec.name, dm.num_classes, dm.input_shape, **model_kwargs(spec))
        ckpt = spec.get("ckpt") or "auto"
        if ckpt == "auto":
            ckpt = str(ensure_teacher(cfg, spec))
        load_weights(model, ckpt, allow_pickle=bool(spec.get("allow_pickle", False)))
        teachers.append(freeze(model))
    return teachers


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed where the hardware runs it natively, else 32-true."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        chosen = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    else:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        chosen = "bf16-mixed" if native else "32-true"
    log.info("trainer.precision=auto -> %s", chosen)
    return chosen


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if "spawn" in str(kwargs.get("strategy", "")):
        # Spawned ranks train copies of the module; the test-time reliability bins and
        # method results would stay in those processes.
        raise ConfigError(f"trainer.strategy={kwargs['strategy']} is not supported; use "
                          "trainer=ddp (trainer.strategy=ddp)")
    kwargs["precision"] = resolve_precision(str(kwargs.get("precision", "auto")),
                                            str(kwargs.get("accelerator", "auto")))
    loggers = build_loggers(cfg, output_dir)
    return L.Trainer(**kwargs, logger=loggers or False, callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()],
                     default_root_dir=str(output_dir), use_distributed_sampler=False,
                     enable_model_summary=False)


def _unwrap(e: Exception, group: str) -> Exception:
    """Hydra's instantiate wraps constructor errors: return ours, or name the bad value."""
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for cause in chain:
        if isinstance(cause, KdlabError):
            return cause
    root = chain[-1]
    return ConfigError(f"invalid {group} settings ({type(root).__name__}: {root}); "
                       f"check the {group}.* overrides against `kdlab train --help`")


# -- the teacher cache -------------------------------------------------------------------------


TEACHER_KEYS = ("ckpt", "allow_pickle", "lr")  # how to get a teacher, not its architecture


def teacher_training_config(cfg: DictConfig, spec: DictConfig) -> DictConfig:
    """The CE run that trains teacher ``spec`` when no checkpoint is given.

    Same data, noise, split, seed, epochs and schedule as the run; the learning rate is
    ``teacher.lr`` if set, else the dataset recipe's (a student-specific lr, e.g. 0.01 for
    ShuffleNet students, does not leak into the teacher). One process, CSV log only.
    """
    teacher_cfg = cfg.copy()
    OmegaConf.set_struct(teacher_cfg, False)
    teacher_cfg.method = {"_target_": "kdlab.methods.ce.CE"}
    teacher_cfg.student = {k: v for k, v in spec.items() if k not in TEACHER_KEYS}
    teacher_cfg.teachers = None
    teacher_cfg.resume = False
    teacher_cfg.optimizer.lr = spec.get("lr") or cfg.dataset.recipe.lr
    # One process: a nested multi-process launch would re-run this whole script.
    teacher_cfg.trainer.strategy = "auto"
    teacher_cfg.trainer.devices = 1
    teacher_cfg.logger = {"csv": cfg.logger.csv} if "csv" in (cfg.logger or {}) else {}
    return teacher_cfg


def teacher_cache_dir(teacher_cfg: DictConfig) -> Path:
    """Cache entry keyed by everything that determines a CE-trained teacher."""
    key_source = {
        "dataset": OmegaConf.to_container(teacher_cfg.dataset, resolve=True),
        "noise": OmegaConf.to_container(teacher_cfg.noise, resolve=True),
        "arch": OmegaConf.to_container(teacher_cfg.student, resolve=True),
        "optimizer": OmegaConf.to_container(teacher_cfg.optimizer, resolve=True),
        "scheduler": OmegaConf.to_container(teacher_cfg.scheduler, resolve=True),
        "max_epochs": teacher_cfg.trainer.max_epochs,
        "precision": teacher_cfg.trainer.precision,
        "seed": teacher_cfg.seed,
    }
    for k in ("root", "download", "num_workers"):  # where/how data is read changes nothing
        key_source["dataset"].pop(k, None)
    digest = hashlib.sha256(json.dumps(key_source, sort_keys=True).encode()).hexdigest()[:16]
    dataset = teacher_cfg.dataset._target_.rsplit(".", 1)[-1].replace("DataModule", "").lower()
    name = teacher_cfg.student.name
    return Path(teacher_cfg.paths.cache_dir) / "teachers" / f"{dataset}-{name}-{digest}"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_teacher(cfg: DictConfig, spec: DictConfig) -> Path:
    """Return the cached teacher weights, training the teacher with CE first if needed."""
    teacher_cfg = teacher_training_config(cfg, spec)
    entry = teacher_cache_dir(teacher_cfg)
    weights = entry / "teacher.pt"
    if weights.is_file():
        log.info("reusing cached teacher %s: %s", spec.name, weights)
        return weights
    with _locked(entry.parent / ".locks" / f"{entry.name}.lock"):
        if weights.is_file():  # another job trained it while we waited
            return weights
        log.info("no teacher.ckpt given: training teacher %s with CE -> %s", spec.name, entry)
        run_dir = entry / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        results = run(teacher_cfg, run_dir)
        best = torch.load(results["checkpoints"]["best"], map_location="cpu", weights_only=True)
        atomic_write_json(entry / "meta.json", {"arch": spec.name, "run_dir": str(run_dir),
                                                "test": results["test"],
                                                "best_epoch": results["best_epoch"]})
        atomic_torch_save(best["state_dict"], weights)
    return weights


# -- one run -----------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed: a kill never leaves half a file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def is_launching_process() -> bool:
    """False in the ranks that a distributed launcher started in addition to rank 0."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint to continue from, after checking the directory may be used at all.

    A finished run is never overwritten; an unfinished one is continued only with
    ``resume=true`` and the same config.
    """
    finished = finished_run_error(output_dir)
    if finished:
        raise finished
    last = output_dir / "checkpoints" / "last.ckpt"
    if not cfg.get("resume"):
        if last.exists() and is_launching_process():
            raise ConfigError(f"{output_dir} holds an unfinished run (checkpoints/last.ckpt); "
                              "continue it with resume=true or choose another hydra.run.dir")
        return None
    saved = output_dir / "config.yaml"
    if saved.exists():
        before = OmegaConf.to_container(OmegaConf.load(saved))
        now = OmegaConf.to_container(cfg, resolve=True)
        changed = [k for k in _differing_keys(before, now) if k != "resume"]
        if changed:
            raise ConfigError(f"resume=true with another config than the run in {output_dir} "
                              f"(differs in: {', '.join(changed[:6])}); use the same overrides")
    if not last.exists():
        log.warning("resume=true but %s has no checkpoint yet: starting from scratch", output_dir)
        return None
    log.info("resuming from %s", last)
    return str(last)


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b), key=str)
                for k in _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _keep_metrics_for_resume(output_dir: Path) -> list[Path]:
    """Lightning's CSV logger deletes an existing metrics.csv: set the files aside first."""
    kept = []
    for path in output_dir.glob("**/metrics.csv"):
        aside = path.with_name("metrics.before-resume.csv")
        os.replace(path, aside)
        kept.append(aside)
    return kept


def _merge_resumed_metrics(kept: list[Path], resumed_from_epoch: int) -> None:
    """Rows logged before the checkpoint's epoch + rows of the continued run, in one file."""
    for aside in kept:
        path = aside.with_name("metrics.csv")
        old = [r for r in csv.DictReader(aside.open()) if r.get("epoch") not in (None, "")
               and int(r["epoch"]) <= resumed_from_epoch]
        new = list(csv.DictReader(path.open())) if path.exists() else []
        fields = sorted({k for r in old + new for k in r})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields)
        writer.writeheader()
        writer.writerows(old + new)
        atomic_write_text(path, buf.getvalue())
        aside.unlink()


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate one configuration; everything lands in ``output_dir``.

    A run that fails leaves ``failed.json`` (the error, one line) next to what it wrote, so
    sweeps and reports can tell failed runs from finished and unfinished ones.
    """
    output_dir = Path(output_dir)
    check_teacher_cache_mode(str(cfg.get("teacher_cache", "auto")))
    ckpt_path = resume_checkpoint(cfg, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "failed.json").unlink(missing_ok=True)
    try:
        return _run(cfg, output_dir, ckpt_path)
    except BaseException as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        atomic_write_json(output_dir / "failed.json", {
            "status": "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
            "error": f"{type(e).__name__}: {message}", "host": host()})
        raise


def host() -> dict[str, Any]:
    """Where a run ran (a sweep's jobs on a cluster or in parallel workers)."""
    return {"hostname": socket.gethostname(), "pid": os.getpid()}


def _run(cfg: DictConfig, output_dir: Path, ckpt_path: str | None) -> dict[str, Any]:
    start = time.time()
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)

    dm = build_datamodule(cfg)
    method = build_method(cfg)
    teachers = build_teachers(cfg, dm) if method.needs_teacher else []
    # Re-seed so the student starts from the same weights with or without teachers.
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    student = build_model(cfg.student.name, dm.num_classes, dm.input_shape,
                          **model_kwargs(cfg.student))
    specs = teacher_specs(cfg) if teachers else []
    module = DistillModule(student, method, teachers, dm.num_classes,
                           optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
                           scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
                           teacher_names=[s.name for s in specs], seed=int(cfg.seed),
                           teacher_cache=str(cfg.get("teacher_cache", "auto")),
                           teacher_cache_dir=Path(cfg.paths.cache_dir) / "teacher_logits")
    if cfg.get("compile"):
        inductor_dir = Path(cfg.paths.cache_dir) / "inductor"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_dir))
        for model in (student, *teachers):
            model.compile()
    checkpoint = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="best-e{epoch:03d}",
                                 monitor="val/acc", mode="max", save_last=True,
                                 auto_insert_metric_name=False)
    kept_metrics = _keep_metrics_for_resume(output_dir) if ckpt_path else []
    throughput = TrainThroughput()
    trainer = build_trainer(cfg, output_dir, [checkpoint, throughput])

    with _loggers_closed_on_failure(trainer):
        resumed_from = (torch.load(ckpt_path, map_location="cpu", weights_only=True)["epoch"]
                        if ckpt_path else None)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        if kept_metrics and trainer.is_global_zero:
            _merge_resumed_metrics(kept_metrics, resumed_from)
        if trainer.world_size > 1:  # before any checkpoint is loaded back: the ranks' own state
            write_rank_record(output_dir, trainer.global_rank, module, trainer.callback_metrics)
        last = trainer.test(module, datamodule=dm, verbose=False)[0]
        best_path = checkpoint.best_model_path
        best = trainer.test(module, datamodule=dm, ckpt_path=best_path, weights_only=True,
                            verbose=False)[0]
        bins = module.reliability_bins
        val = trainer.validate(module, datamodule=dm, verbose=False)[0]  # best weights loaded

        results = {
            "status": "finished",
            "method": method.name,
            "dataset": dm.name,
            "seed": int(cfg.seed),
            "student": cfg.student.name,
            "selection": "best epoch by val/acc on the clean validation split; test never used",
            "best_epoch": _epoch_of(best_path),
            "epochs": int(trainer.current_epoch),
            "test": _metrics(best, "test/"),
            "test_last": _metrics(last, "test/"),
            "val": _metrics(val, "val/"),
            "teachers": [{"arch": s.name, "test": _metrics(best, f"teacher{i}/test/"),
                          "agreement": best.get(f"teacher{i}/test/agreement")}
                         for i, s in enumerate(specs)],
            "reliability": {"n_bins": len(bins["count"]),
                            **{k: [float(x) for x in v] for k, v in bins.items()}},
            "noise": dm.describe()["noise"],
            "split_sizes": dm.describe()["sizes"],
            "checkpoints": {"best": best_path, "last": checkpoint.last_model_path},
            "precision": str(trainer.precision),
            "throughput": {**throughput.summary(),
                           "teacher_cache_s": round(module.teacher_cache_seconds, 3),
                           "teacher_cache_loaded": module.teacher_cache_loaded},
            "wall_time_s": round(time.time() - start, 2),
            "host": host(),
        }
        results.update(method.results())
        if trainer.is_global_zero:
            title = f"{method.name} / {cfg.student.name} on {dm.name} test (best on val)"
            reliability_diagram(bins, output_dir / "reliability_test.png", title)
            atomic_write_json(output_dir / "results.json", results)
            finalize_loggers(trainer.loggers, cfg, results, output_dir)
            print(summary_table(results, output_dir))
        return results


@contextmanager
def _loggers_closed_on_failure(trainer: L.Trainer):
    """A failed run closes its loggers at once (a wandb run is marked failed)."""
    try:
        yield
    except BaseException:
        close_loggers(trainer.loggers)
        raise


def write_rank_record(output_dir: Path, rank: int, module: DistillModule,
                      logged: dict[str, Tensor]) -> None:
    """Each DDP rank writes a digest of its weights and method state after training, and
    its last validation metrics: they must agree across ranks."""
    val = {k: float(v) for k, v in logged.items() if k.startswith("val/")}
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    atomic_write_json(output_dir / "ranks" / f"rank{rank}.json",
                      {"rank": rank, "state_sha256": digest.hexdigest(), "val": val})


def _metrics(logged: dict[str, float], prefix: str) -> dict[str, float]:
    return {k: float(logged[prefix + k]) for k in RESULT_METRICS if prefix + k in logged}


def _epoch_of(ckpt_path: str) -> int | None:
    m = re.search(r"best-e(\d+)", Path(ckpt_path).name)
    return int(m.group(1)) if m else None


def summary_table(results: dict[str, Any], output_dir: Path) -> str:
    rows = [(f"teacher {t['arch']}", t["test"]) for t in results["teachers"]]
    rows += [(f"student {results['student']} (best on val, epoch {results['best_epoch']})",
              results["test"]),
             (f"student {results['student']} (last epoch)", results["test_last"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"\nkdlab: method={results['method']} dataset={results['dataset']} "
             f"seed={results['seed']} noise={results['noise']['type']}:"
             f"{results['noise']['rate']} ({results['wall_time_s']:.0f} s)",
             f"{'test set':<{width}}  {'acc':>7}  {'ECE':>7}  {'NLL':>7}"]
    for name, m in rows:
        lines.append(f"{name:<{width}}  {m['acc']:7.4f}  {m['ece']:7.4f}  {m['nll']:7.4f}")
    lines.append(f"run directory: {output_dir}")
    return "\n".join(lines)
