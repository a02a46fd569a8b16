"""``generations=N``: a chain of students, each distilled from the previous one.

:func:`kdlab.pipeline.run` runs the chain, one run per generation in ``generation1`` ..
``generationN``; here are each generation's config and the chain's summary.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

# What results.json's "generations" list keeps of each generation's own results.
GENERATION_KEYS = ("best_epoch", "selection", "test", "test_last", "val")


def generation_config(cfg: DictConfig, k: int, teacher: DictConfig) -> DictConfig:
    """Generation ``k``'s run (from 1): ``cfg`` as one generation distilled from ``teacher``
    (the run's own teacher for the first, a student checkpoint after)."""
    gen_cfg = cfg.copy()
    OmegaConf.set_struct(gen_cfg, False)
    gen_cfg.generations = 1
    gen_cfg.teacher = teacher
    gen_cfg.teachers = None
    gen_cfg.choices.teacher = cfg.choices.teacher if k == 1 else cfg.choices.student
    return gen_cfg


def next_teacher(cfg: DictConfig, results: dict[str, Any]) -> DictConfig:
    """The next generation's teacher: the student's architecture, re-initialised, loaded
    from the best checkpoint of the generation that just finished."""
    return OmegaConf.create({**OmegaConf.to_container(cfg.student, resolve=True),
                             "ckpt": results["checkpoints"]["best"]})


def chain_summary(generations: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """results.json of the whole chain from each generation's (run dir, results): the last
    generation's results (its test numbers are the run's), the first one's teachers, and
    one entry per generation."""
    first, last = generations[0][1], generations[-1][1]
    return {**last, "teachers": first["teachers"],
            "generations": [{"generation": k, "run_dir": run_dir,
                             **{key: results[key] for key in GENERATION_KEYS}}
                            for k, (run_dir, results) in enumerate(generations, start=1)]}
