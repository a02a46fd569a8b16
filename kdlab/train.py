"""The one place that assembles one run from the composed config: instantiate, fit, test,
write. It is called by :mod:`kdlab.pipeline` (which validates the config, opens the run
directory and trains the missing teachers first) and calls nothing back.

datamodule, teachers (their weights given), student + method (the :class:`DistillModule`),
loggers, callbacks and trainer are built here; then fit (validating each epoch;
:class:`SelectionCheckpoint` keeps the epoch the selection rule chooses), test (the last
epoch, logged as ``test_last/...``; the selected epoch, logged as ``test/...`` with the
teachers and peers), and the run directory is completed with ``results.json``, the
reliability diagram and a summary table.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from .callbacks import RunEstimate, SelectionCheckpoint, TrainThroughput
from .data import SplitDataModule, instantiate_datamodule
from .errors import KdlabError
from .loggers import close_loggers, finalize_loggers, quiet_lightning, write_to_log_files
from .metrics import logged_metrics
from .models import describe_model
from .module import DistillModule
from .plots import reliability_diagram
from .run_dir import RunDir, host
from .selection import selection_rule
from .summary import run_summary
from .teacher_config import TeacherSpec
from .teachers import Teachers, load_teachers
from .trainer import build_trainer


def build_module(cfg: DictConfig, dm: SplitDataModule, teacher_specs: list[TeacherSpec]
                 ) -> DistillModule:
    """The LightningModule of ``cfg`` for the (set-up) datamodule ``dm``: the teachers
    (their weights given: :func:`kdlab.pipeline.trained_teachers`) loaded and frozen, the
    student seeded by ``cfg.seed``."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    loaded = load_teachers(teacher_specs, dm.num_classes, dm.input_shape)
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


def run(cfg: DictConfig, run_dir: RunDir, teacher_specs: list[TeacherSpec],
        ckpt_path: str | None = None) -> dict[str, Any]:
    """One run of ``cfg`` in the opened ``run_dir`` (from ``ckpt_path`` when it resumes):
    fit, test, and write results.json; returns the results."""
    start = time.time()
    quiet_lightning()
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    dm = instantiate_datamodule(cfg)
    dm.setup()
    module = build_module(cfg, dm, teacher_specs)
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
    data_report = dm.data_report()  # every rank: the streaming datasets gather their counts
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
        **({"data": data_report} if data_report else {}),
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

