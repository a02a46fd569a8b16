"""``generations=N``: a chain of students, each distilled from the previous one."""

from __future__ import annotations

import json
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .run_dir import RunDir


def run_generations(cfg: DictConfig, run_dir: RunDir) -> dict[str, Any]:
    """``generations=N``: N students in ``generation1`` .. ``generationN``, the first distilled
    from ``teacher``, each next one from the previous student's best checkpoint (same
    architecture, re-initialised). A finished generation is kept when the run is continued.
    The run's results.json summarises them; its test numbers are the last generation's."""
    from .train import run  # each generation is a run of its own

    run_dir.open(cfg)
    try:
        generations = []
        teacher = cfg.teacher
        for k in range(1, int(cfg.generations) + 1):
            gen_cfg = cfg.copy()
            OmegaConf.set_struct(gen_cfg, False)
            gen_cfg.generations = 1
            gen_cfg.teacher = teacher
            gen_cfg.teachers = None
            gen_cfg.choices.teacher = cfg.choices.teacher if k == 1 else cfg.choices.student
            gen_dir = run_dir.path / f"generation{k}"
            done = gen_dir / "results.json"
            results = json.loads(done.read_text()) if done.exists() else run(gen_cfg, gen_dir)
            generations.append({"generation": k, "run_dir": str(gen_dir),
                                **{key: results[key] for key in ("best_epoch", "selection",
                                                                  "test", "test_last", "val")}})
            teacher = OmegaConf.create({**OmegaConf.to_container(cfg.student, resolve=True),
                                        "ckpt": results["checkpoints"]["best"]})
        summary = {**results, "generations": generations,
                   "teachers": json.loads((run_dir.path / "generation1" / "results.json")
                                          .read_text())["teachers"]}
        run_dir.write_results(summary)
        return summary
    except BaseException as e:
        if not (run_dir.path / "results.json").exists():
            run_dir.write_failed(e)
        raise
