"""Sweeps: joblib and submitit_local launchers, the SLURM config, Optuna, the DDP guard.

Few, fat CLI tests (each pays ~7 s start-up, and each joblib worker / submitit job again);
the config-level checks run in-process through Hydra's compose API. The basic launcher's
multirun is exercised end to end in tests/test_report.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import submitit
import yaml
from conftest import run_kdlab
from hydra import compose, initialize_config_module
from hydra.utils import instantiate

from kdlab.cli import launcher_strategy_error
from kdlab.config import conf_dir, register_model_groups

TINY = ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "num_threads=1"]
# `hparams_search` is appended with `+` unless conf/train.yaml lists the group in its defaults.
HPARAMS = ("" if "hparams_search" in (conf_dir() / "train.yaml").read_text() else "+") + \
    "hparams_search=kd_temperature"


def kdlab(*args: str, cwd: Path, cache: Path, check: bool = True):
    return run_kdlab(*args, cwd=cwd, cache=cache, check=check)


def job_dirs(sweep: Path) -> list[Path]:
    return sorted((d for d in sweep.iterdir() if (d / ".hydra").is_dir()),
                  key=lambda d: int(d.name.split("-", 1)[0]))


def overrides(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())


def hydra_cfg(overrides: list[str]):
    register_model_groups()
    with initialize_config_module("kdlab.conf", version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


# -- end to end --------------------------------------------------------------------------------


def test_joblib_runs_jobs_in_parallel_trains_a_shared_teacher_once_and_survives_a_failure(
        tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    # jobs 0, 1: KD with two temperatures, same teacher (seed 5), started together by
    # n_jobs=2; jobs 2, 3: an invalid noise rate, each fails on its own
    out = kdlab("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                "noise.rate=0,2", "method.temperature=2,4", "seed=5", *TINY,
                f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=cache, check=False)
    assert out.returncode != 0 and "noise.rate must be in [0, 1]" in out.stderr
    jobs = job_dirs(sweep)
    assert len(jobs) == 4
    finished, failed = jobs[:2], jobs[2:]
    for job in failed:
        assert "noise.rate=2" in overrides(job) and not (job / "results.json").exists()
        record = json.loads((job / "failed.json").read_text())
        assert record["status"] == "failed" and "noise.rate must be in [0, 1]" in record["error"]
    results = [json.loads((job / "results.json").read_text()) for job in finished]
    # the jobs ran in joblib's two worker processes, not one after another in the launcher's
    records = results + [json.loads((job / "failed.json").read_text()) for job in failed]
    assert len({r["host"]["pid"] for r in records}) == 2
    # one cache entry, one teacher training run in it, used by both jobs
    entries = [e for e in (cache / "teachers").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1
    assert len(list(entries[0].glob("run-*"))) == 1
    meta = json.loads((entries[0] / "meta.json").read_text())
    for r in results:
        assert r["teachers"][0]["test"]["acc"] == pytest.approx(meta["test"]["acc"], abs=1e-6)
    assert {r["method"] for r in results} == {"kd"}


def test_submitit_local_runs_the_sweep_and_refuses_ddp(tmp_path):
    sweep = tmp_path / "sweep"
    out = kdlab("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=0",
                "hydra.launcher.mem_gb=2", "method=ce", "trainer.strategy=auto,ddp", *TINY,
                f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=tmp_path / "cache",
                check=False)
    assert out.returncode != 0
    assert "trainer.strategy=ddp" in out.stderr and "submitit_local" in out.stderr
    assert "single-device jobs" in out.stderr
    ok, refused = job_dirs(sweep)
    results = json.loads((ok / "results.json").read_text())
    assert results["method"] == "ce" and 0.0 <= results["test"]["acc"] <= 1.0
    assert "ConfigError" in json.loads((refused / "failed.json").read_text())["error"]
    assert not (refused / "config.yaml").exists()  # stopped before training started
    # submitit_local sends each job's output to <sweep>/.submitit/<id>/ files
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2
    assert any(f"run directory: {ok}" in log.read_text() for log in logs)


def test_optuna_study_maximises_the_returned_val_acc(tmp_path):
    sweep = tmp_path / "sweep"
    kdlab("train", "-m", HPARAMS, "hydra.sweeper.n_trials=2", "seed=5", *TINY,
          f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=tmp_path / "cache")
    trials = job_dirs(sweep)
    assert len(trials) == 2
    val_acc, params = [], []
    for trial in trials:
        results = json.loads((trial / "results.json").read_text())
        assert results["method"] == "kd"
        val_acc.append(results["val"]["acc"])
        params.append(dict(o.split("=", 1) for o in overrides(trial) if o.startswith("method.")))
        assert 1.0 <= float(params[-1]["method.temperature"]) <= 10.0
        assert 0.1 <= float(params[-1]["method.kd_weight"]) <= 1.0
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(val_acc), abs=1e-7)
    winner = params[val_acc.index(max(val_acc))]
    assert {k: float(v) for k, v in winner.items()} == pytest.approx(best["best_params"])


# -- in-process: configs -----------------------------------------------------------------------


@pytest.mark.parametrize("overrides, refused", [
    (["hydra/launcher=joblib", "trainer.strategy=ddp"], "joblib"),
    (["hydra/launcher=joblib", "trainer.strategy=ddp_spawn"], "joblib"),
    (["hydra/launcher=joblib", "trainer.devices=2"], "joblib"),
    (["hydra/launcher=joblib"], None),
    (["hydra/launcher=submitit_local", "trainer.strategy=ddp"], "submitit_local"),
    (["hydra/launcher=submitit_local", "trainer.strategy=ddp_spawn", "trainer.devices=2"],
     "submitit_local"),
    (["trainer.strategy=ddp"], None),  # basic launcher: works (see the docs for its caveat)
    (["hydra/launcher=slurm", "trainer.strategy=ddp", "trainer.devices=2"], "tasks_per_node=2"),
    (["hydra/launcher=slurm", "trainer.strategy=ddp", "trainer.devices=2",
      "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2"], None),
])
def test_ddp_guard_under_sweep_launchers(overrides, refused):
    cfg = hydra_cfg(["hydra.mode=MULTIRUN", *overrides])
    error = launcher_strategy_error(cfg.trainer, cfg.hydra)
    if refused is None:
        assert error is None
    else:
        assert error is not None and refused in error
    # a single run (no -m) is never refused: Lightning launches DDP itself
    single = hydra_cfg(overrides)
    assert launcher_strategy_error(single.trainer, single.hydra) is None


def test_slurm_config_reaches_the_sbatch_script(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks it exists
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    cfg = hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                     "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=90",
                     "hydra.launcher.cpus_per_task=6", "hydra.launcher.mem_gb=40",
                     "hydra.launcher.setup=[module load cuda]", f"hydra.sweep.dir={tmp_path}"])
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=None, config=cfg)

    class Submitted(Exception):
        pass

    def capture(executor, *args):
        raise Submitted(executor)

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    with pytest.raises(Submitted) as submitted:
        launcher.launch([["method=ce"]], initial_job_idx=0)
    sbatch = submitted.value.args[0]._executor._make_submission_file_text("python job.py", "u")
    for line in ("--partition=gpu", "--gpus-per-node=2", "--time=90", "--cpus-per-task=6",
                 "--mem=40GB", "--job-name=kdlab", "--ntasks-per-node=1"):
        assert f"#SBATCH {line}\n" in sbatch
    assert "module load cuda" in sbatch and f"{tmp_path}/.submitit/" in sbatch


def test_hparams_search_config():
    cfg = hydra_cfg([HPARAMS])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"method.temperature", "method.kd_weight", "method.ce_weight"}
    assert cfg.method._target_ == "kdlab.methods.kd.KD"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
