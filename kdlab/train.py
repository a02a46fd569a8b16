"""The one place that assembles a run from the composed config: instantiate, fit, test, write.

datamodule, teachers, student + method (the :class:`DistillModule`), loggers, callbacks and
trainer are built here; then fit (validating each epoch; :class:`SelectionCheckpoint` keeps
the epoch the selection rule chooses), test (the last epoch, logged as ``test_last/...``;
the selected epoch, logged as ``test/...`` with the teachers and peers), and the run
directory is completed with ``results.json``, the reliability diagram and a summary table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar

from .callbacks import EpochProgressBar, RunEstimate, SelectionCheckpoint, TrainThroughput
from .config import instantiate_datamodule, instantiate_method, validate
from .data.base import SplitDataModule
from .errors import KdlabError
from .loggers import (
    build_loggers,
    close_loggers,
    finalize_loggers,
    quiet_lightning,
    write_to_log_files,
)
from .metrics import logged_metrics
from .module import DistillModule
from .plots import reliability_diagram
from .run_dir import AtomicCheckpointIO, RunDir, host
from .selection import selection_rule
from .summary import run_summary
from .teachers import Teachers, describe_model, load_teachers


def build_module(cfg: DictConfig, dm: SplitDataModule) -> DistillModule:
    """The LightningModule of ``cfg`` for the (set-up) datamodule ``dm``: its teachers
    loaded (auto-trained first if needed) and frozen, the student seeded by ``cfg.seed``."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    loaded = (load_teachers(cfg, dm.num_classes, dm.input_shape)
              if instantiate_method(cfg.method).needs_teacher else [])
    teachers = Teachers(loaded, cache_mode=str(cfg.teacher_cache),
                        cache_dir=Path(cfg.paths.cache_dir) / "teacher_logits",
                        cache_runs=int(cfg.get("teacher_cache_runs") or 1))
    # Re-seed so the student starts from the same weights with or without teachers.
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    return DistillModule(student=OmegaConf.to_container(cfg.student, resolve=True),
                         method=OmegaConf.to_container(cfg.method, resolve=True),
                         num_classes=dm.num_classes, input_shape=dm.input_shape,
                         optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
                         scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True),
                         seed=int(cfg.seed), teachers=teachers)


def resolve_precision(precision: str, accelerator: str) -> str:
    """``auto``: bf16-mixed where the hardware runs it natively, else 32-true."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16-mixed" if native else "32-true"


def build_trainer(cfg: DictConfig, output_dir: Path, callbacks: list) -> pl.Trainer:
    user_callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()]
    if cfg.trainer.get("enable_progress_bar", True) and not any(
            isinstance(c, ProgressBar) for c in user_callbacks):
        user_callbacks.append(EpochProgressBar())
    precision = resolve_precision(str(cfg.trainer.precision), str(cfg.trainer.accelerator))
    return instantiate(cfg.trainer, precision=precision,
                       logger=build_loggers(cfg, output_dir) or False,
                       callbacks=callbacks + user_callbacks, plugins=[AtomicCheckpointIO()],
                       default_root_dir=str(output_dir), use_distributed_sampler=False,
                       enable_model_summary=False)


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate one configuration; everything lands in ``output_dir``.

    A config that cannot run is refused before ``output_dir`` is created (in a directory a
    launcher already made, e.g. a sweep job's, the refusal is recorded in failed.json).
    """
    run_dir = RunDir(output_dir)
    try:
        validate(cfg)
    except KdlabError as e:
        run_dir.record_refusal(e)
        raise
    if int(cfg.get("generations") or 1) > 1:
        from .generations import run_generations

        return run_generations(cfg, run_dir)
    ckpt_path = run_dir.open(cfg)
    try:
        return _fit_and_test(cfg, run_dir, ckpt_path)
    except BaseException as e:
        if not (run_dir.path / "results.json").exists():  # e.g. a closed stdout after it
            run_dir.write_failed(e)
        raise


def _fit_and_test(cfg: DictConfig, run_dir: RunDir, ckpt_path: str | None) -> dict[str, Any]:
    start = time.time()
    quiet_lightning()
    run_dir.write_config(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    dm = instantiate_datamodule(cfg)
    dm.setup()
    module = build_module(cfg, dm)
    teachers = module.teachers
    if cfg.get("compile"):
        inductor = Path(cfg.paths.cache_dir) / "inductor"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor))
        for model in (module.student, *teachers):
            model.compile()
    checkpoint = SelectionCheckpoint(run_dir.path / "checkpoints", selection_rule(cfg))
    throughput = TrainThroughput()
    label = f"{cfg.choices.method or module.method.name} / {cfg.choices.student or 'student'}"
    trainer = build_trainer(cfg, run_dir.path, [checkpoint, throughput, RunEstimate(label)])
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
        if ckpt_path and trainer.is_global_zero:
            run_dir.merge_resumed_metrics(ckpt_path)
        chosen = checkpoint.chosen
        if chosen is None:
            raise KdlabError(f"no validation was recorded in {run_dir.path}, so no epoch can be "
                             "selected (a checkpoint written by an older kdlab?); start afresh "
                             "in a new directory")
        module.test_key = "test_last"  # the weights of the last epoch: the student only
        last = trainer.test(module, datamodule=dm, verbose=False)[0]
        module.test_key = "test"  # the selected epoch: student, teachers and peers
        best = trainer.test(module, datamodule=dm, ckpt_path=checkpoint.best_path,
                            weights_only=True, verbose=False)[0]
        bins = module.reliability_bins
    except BaseException:
        close_loggers(trainer.loggers)
        raise
    rule = checkpoint.rule
    epochs = int(trainer.current_epoch)
    results = {
        "status": "finished",
        "method": cfg.choices.method or module.method.name,
        "dataset": cfg.choices.dataset or dm.name,
        "seed": int(cfg.seed),
        "student": describe_model(cfg.choices.student or "student", module.student),
        "selection": {**rule.as_dict(), "epoch": chosen.epoch, "reason": checkpoint.reason(),
                      "rule": rule.describe()},
        "best_epoch": chosen.epoch,
        "epochs": epochs,
        "test": logged_metrics(best, "test/"),
        "test_last": logged_metrics(last, "test_last/"),
        "val": logged_metrics(chosen.values, "val/"),
        "teachers": [{**describe_model(s.name, model), "ckpt": s.ckpt,
                      "test": logged_metrics(best, f"teacher{i}/test/"),
                      "agreement": best.get(f"teacher{i}/test/agreement")}
                     for i, (s, model) in enumerate(zip(teachers.specs, teachers, strict=True))],
        "reliability": {"n_bins": len(bins["count"]),
                        **{k: [float(x) for x in v] for k, v in bins.items()}},
        "noise": dm.describe()["noise"],
        "split_sizes": dm.describe()["sizes"],
        "checkpoints": {"best": checkpoint.best_path, "last": checkpoint.last_path},
        "precision": str(trainer.precision),
        "throughput": {**throughput.summary(),
                       "teacher_cache_s": round(teachers.cache_seconds, 3),
                       "teacher_cache_loaded": teachers.cache_loaded},
        "wall_time_s": round(time.time() - start, 2),
        "host": host(),
        **({"peers": {name: logged_metrics(best, f"peer/{name}/test/")
                      for name in module.method.evaluated_models()}}
           if module.method.evaluated_models() else {}),
        **module.method.results(),
    }
    if trainer.is_global_zero:
        title = (f"{results['method']} / {results['student']['name']} on {results['dataset']}"
                 " test (best on val)")
        reliability_diagram(bins, run_dir.path / "reliability_test.png", title)
        run_dir.write_results(results)
        finalize_loggers(trainer.loggers, cfg, results, run_dir.path)
        summary = run_summary(results, run_dir.path)
        print(summary)
        write_to_log_files(summary)  # train.log: which epoch was selected, and why
    return results


__all__ = ["build_module", "build_trainer", "run"]
