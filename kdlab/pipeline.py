"""Runs made of runs, above the one-run assembler (:mod:`kdlab.train`).

:func:`run` is what ``kdlab train`` (and a script) calls for a whole run, in this order:

1. **validate** the config (:func:`kdlab.preflight.validate`): a refused config creates
   nothing (in a directory a launcher already made, e.g. a sweep job's, the refusal is
   recorded in failed.json); then the run directory is opened (finished? unfinished? resume?);
2. ``generations=N``: **the generations**, a chain of runs of their own in ``generation1`` ..
   ``generationN`` (each through this pipeline), each next teacher the previous student's
   best checkpoint (:mod:`kdlab.generations`);
3. **the missing teachers**: each auto-trained teacher (``ckpt: auto``) that the cache does
   not hold yet is trained first, as a run of its own (CE on the dataset's recipe,
   :mod:`kdlab.teacher_config`), once under a file lock when several jobs need it;
4. **one run** (:func:`kdlab.train.run`) with every teacher's weights resolved.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from . import train
from .errors import KdlabError
from .generations import chain_summary, generation_config, next_teacher
from .io import atomic_torch_save, atomic_write_json, file_lock
from .methods import instantiate_method
from .preflight import validate
from .run_dir import RunDir
from .teacher_config import (
    TeacherSpec,
    recipe_line,
    selected_checkpoint,
    teacher_specs,
    training_config,
    weights_cache_dir,
)

log = logging.getLogger("kdlab")


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Train and evaluate ``cfg`` (its teachers and generations included); everything of
    the run lands in ``output_dir``. Returns the run's results.json."""
    run_dir = RunDir(output_dir)
    try:
        validate(cfg)
    except KdlabError as e:
        run_dir.record_refusal(e)
        raise
    ckpt_path = run_dir.open(cfg)
    try:
        if int(cfg.get("generations") or 1) > 1:
            return run_generations(cfg, run_dir)
        run_dir.write_config(cfg)
        return train.run(cfg, run_dir, trained_teachers(cfg), ckpt_path)
    except BaseException as e:
        if not (run_dir.path / "results.json").exists():  # e.g. a closed stdout after it
            run_dir.write_failed(e)
        raise


def run_generations(cfg: DictConfig, run_dir: RunDir) -> dict[str, Any]:
    """``generations=N``: N students in ``generation1`` .. ``generationN``, the first distilled
    from ``teacher``, each next one from the previous student's best checkpoint (same
    architecture, re-initialised). A finished generation is kept when the run is continued.
    The run's results.json summarises them; its test numbers are the last generation's."""
    generations = []
    teacher = cfg.teacher
    for k in range(1, int(cfg.generations) + 1):
        gen_dir = run_dir.path / f"generation{k}"
        done = gen_dir / "results.json"
        results = (json.loads(done.read_text()) if done.exists()
                   else run(generation_config(cfg, k, teacher), gen_dir))
        generations.append((str(gen_dir), results))
        teacher = next_teacher(cfg, results)
    summary = chain_summary(generations)
    run_dir.write_results(summary)
    return summary


def trained_teachers(cfg: DictConfig) -> list[TeacherSpec]:
    """The run's teachers (none for a method without one), each with the weights to load:
    the ``ckpt`` given, or the auto-trained teacher's cached weights (trained now if the
    cache has none)."""
    if not instantiate_method(cfg.method).needs_teacher:
        return []
    return [spec if spec.weights else replace(spec, weights=str(ensure_trained(cfg, spec)))
            for spec in teacher_specs(cfg)]


def ensure_trained(cfg: DictConfig, spec: TeacherSpec) -> Path:
    """The cached weights of an auto-trained teacher, training it with CE first if needed."""
    teacher_cfg = training_config(cfg, spec)
    entry = weights_cache_dir(teacher_cfg)
    weights = entry / "teacher.pt"
    if weights.is_file():
        log.info("teacher %s: reuse %s (%s; CE: %s)", spec.name, weights,
                 selected_checkpoint(entry) or "its best epoch", recipe_line(teacher_cfg))
        return weights
    with file_lock(entry.parent / ".locks" / f"{entry.name}.lock"):
        if weights.is_file():  # another job trained it while we waited
            return weights
        log.info("teacher %s: no %s.ckpt given, training it with CE first: %s -> %s",
                 spec.name, spec.where, recipe_line(teacher_cfg), entry)
        teacher_dir = entry / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        results = run(teacher_cfg, teacher_dir)  # a kdlab run of its own
        best = torch.load(results["checkpoints"]["best"], map_location="cpu", weights_only=True)
        atomic_write_json(entry / "meta.json", {"arch": spec.name, "run_dir": str(teacher_dir),
                                                "recipe": recipe_line(teacher_cfg),
                                                "test": results["test"],
                                                "best_epoch": results["best_epoch"],
                                                "epochs": results["epochs"],
                                                "selection": results["selection"]})
        atomic_torch_save(best["state_dict"], weights)
        log.info("teacher %s: trained; the students learn from %s (%s)", spec.name,
                 selected_checkpoint(entry), results["selection"]["reason"])
    return weights


__all__ = ["ensure_trained", "run", "run_generations", "trained_teachers"]
