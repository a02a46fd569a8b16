"""Sweeps: 8 jobs on joblib (2 at a time, one failing, one shared teacher), Optuna, the
submitit_local launcher, the SLURM config, and the DDP guard under sweep launchers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers.cli import cli, kdlab_process

from kdlab.cli import launcher_strategy_error, name_swept_keys
from kdlab.config import compose as kdlab_compose

TINY = ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "num_threads=1", "teacher.max_epochs=1"]


def job_dirs(sweep: Path) -> list[Path]:
    """The jobs in their order: by trial number (Optuna), else by their overrides (the
    directory names of a grid sweep)."""
    jobs = [d for d in sweep.iterdir() if (d / ".hydra").is_dir()]
    return sorted(jobs, key=lambda d: yaml.safe_load((d / ".hydra" / "hydra.yaml").read_text())
                  ["hydra"]["job"]["num"])


def overrides(run_dir: Path) -> list[str]:
    return yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())


def hydra_cfg(args: list[str]):
    from hydra import compose, initialize_config_module

    with initialize_config_module("kdlab.conf", version_base="1.3"):
        return compose("train", overrides=args, return_hydra_config=True)


def test_six_jobs_two_at_a_time_one_failing_one_teacher(tmp_path):
    """joblib with n_jobs=2: every job runs in one of two worker processes, the auto-trained
    teacher they share is trained once (under the cache lock), the failing job records its
    error and the others finish; job directories name their seed."""
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    fractions = [0.1, 0.3, 1.5]  # 1.5 is invalid
    out = cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "method=kd",
              "dataset.meta_fraction=" + ",".join(map(str, fractions)), "seed=0,1", *TINY,
              f"hydra.sweep.dir={sweep}", cwd=tmp_path, env={"KDLAB_CACHE_DIR": str(cache)})
    assert out.returncode != 0  # the sweep reports its failed jobs ...
    jobs = job_dirs(sweep)
    assert len(jobs) == 6
    finished = [j for j in jobs if (j / "results.json").exists()]
    failed = [j for j in jobs if (j / "failed.json").exists()]
    assert len(finished) == 4 and len(failed) == 2  # ... and the others all finished
    for job in failed:
        record = json.loads((job / "failed.json").read_text())
        assert "dataset.meta_fraction=1.5" in overrides(job) and "meta_fraction" in record["error"]
    records = [json.loads((j / "results.json").read_text()) for j in finished]
    # job directories tell the seeds apart: "dataset.meta_fraction=0.1,seed=1,..."
    for job, r in zip(finished, records, strict=True):
        assert f"seed={r['seed']}" in job.name.split(",") and "meta_fraction=" in job.name
        fraction = float(job.name.split("meta_fraction=")[1].split(",")[0])
        assert abs(r["split_sizes"]["meta"] - fraction * 1437) <= 1  # of train + meta + val
    # the jobs ran in joblib's two worker processes, not one after another
    assert len({r["host"]["pid"] for r in records}) == 2
    # one teacher per (split, seed): trained once each, shared by the jobs that need it
    entries = [e for e in (cache / "teachers").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 4 and all(len(list(e.glob("run-*"))) == 1 for e in entries)


def test_optuna_study_maximises_the_returned_val_acc(tmp_path):
    sweep = tmp_path / "sweep"
    out = cli("train", "-m", "hparams_search=kd_temperature", "hydra.sweeper.n_trials=2",
              "seed=5", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
              env={"KDLAB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    trials = job_dirs(sweep)
    assert len(trials) == 2
    val_acc, params = [], []
    for trial in trials:
        results = json.loads((trial / "results.json").read_text())
        val_acc.append(results["val"]["acc"])
        params.append(dict(o.split("=", 1) for o in overrides(trial) if o.startswith("method.")))
        assert 1.0 <= float(params[-1]["method.temperature"]) <= 10.0
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(val_acc), abs=1e-7)
    winner = params[val_acc.index(max(val_acc))]
    assert {k: float(v) for k, v in winner.items()} == pytest.approx(best["best_params"])
    # resumed: the study samples the same trials, each skipped with its recorded val acc
    again = cli("train", "-m", "hparams_search=kd_temperature", "hydra.sweeper.n_trials=2",
                "seed=5", *TINY, f"hydra.sweep.dir={sweep}", "resume=true", cwd=tmp_path,
                env={"KDLAB_CACHE_DIR": str(tmp_path / "cache")})
    assert again.returncode == 0, again.stderr[-2000:]
    assert job_dirs(sweep) == trials
    for trial in trials:
        assert f"already finished: {trial}, skipped" in again.stdout
    assert yaml.safe_load((sweep / "optimization_results.yaml").read_text()) == best


def test_submitit_local_runs_the_sweep_and_refuses_ddp(tmp_path):
    sweep = tmp_path / "sweep"
    out = kdlab_process("train", "-m", "hydra/launcher=submitit_local",
                        "hydra.launcher.timeout_min=10", "hydra.launcher.cpus_per_task=1",
                        "hydra.launcher.gpus_per_node=0", "hydra.launcher.mem_gb=2",
                        "method=ce", "trainer.strategy=auto,ddp", *TINY,
                        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                        env={"KDLAB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode != 0
    assert "trainer.strategy=ddp" in out.stderr and "single-device jobs" in out.stderr
    ok, refused = job_dirs(sweep)
    assert json.loads((ok / "results.json").read_text())["method"] == "ce"
    assert "ConfigError" in json.loads((refused / "failed.json").read_text())["error"]
    assert not (refused / "config.yaml").exists()  # stopped before training started
    logs = list((sweep / ".submitit").glob("*/*_log.out"))  # job output goes to files
    assert any(f"run directory: {ok}" in log.read_text() for log in logs)


@pytest.mark.parametrize("args, refused", [
    (["hydra/launcher=joblib", "trainer.strategy=ddp"], "joblib"),
    (["hydra/launcher=joblib", "trainer.devices=2"], "joblib"),
    (["hydra/launcher=joblib"], None),
    (["hydra/launcher=submitit_local", "trainer.strategy=ddp"], "submitit_local"),
    (["trainer.strategy=ddp"], None),  # basic launcher: works (see the docs for its caveat)
    (["hydra/launcher=slurm", "trainer.strategy=ddp", "trainer.devices=2"], "tasks_per_node=2"),
    (["hydra/launcher=slurm", "trainer.strategy=ddp", "trainer.devices=2",
      "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2"], None),
    # two nodes: the SLURM job's nodes and Lightning's num_nodes must agree
    (["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2",
      "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2"],
     "hydra.launcher.nodes=1"),
    (["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "hydra.launcher.nodes=2",
      "hydra.launcher.tasks_per_node=2", "hydra.launcher.gpus_per_node=2"], None),
])
def test_ddp_guard_under_sweep_launchers(args, refused):
    cfg = hydra_cfg(["hydra.mode=MULTIRUN", *args])
    error = launcher_strategy_error(cfg.trainer, cfg.hydra)
    assert error is None if refused is None else refused in error
    # a single run (no -m) is never refused: Lightning launches DDP itself
    single = hydra_cfg(args)
    assert launcher_strategy_error(single.trainer, single.hydra) is None


def test_slurm_launcher_config():
    cfg = hydra_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                     "hydra.launcher.timeout_min=90"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node,
            launcher.tasks_per_node) == ("gpu", 90, 1, 1)


def test_hparams_search_config():
    cfg = kdlab_compose(["hparams_search=kd_temperature"])
    assert cfg.method._target_ == "kdlab.methods.kd.KD"
    sweeper = hydra_cfg(["hparams_search=kd_temperature"]).hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"method.temperature", "method.kd_weight", "method.ce_weight"}


def test_job_directories_are_named_by_the_experiment_alone():
    """No job number, and none of the keys that do not change the experiment (resume,
    loggers, threads, machine paths, caches): the same sweep run again, resumed or on
    another machine, finds the directories of its jobs."""
    cfg = hydra_cfg(["hydra.mode=MULTIRUN", "seed=3", "method=kd", "resume=true",
                     "logger=wandb", "logger.wandb.project=p", "num_threads=1",
                     "trainer.enable_progress_bar=false", "dataset.num_workers=2",
                     "paths.data_dir=/data", "paths.cache_dir=/cache", "teacher_cache=off",
                     "teacher_cache_runs=4", "compile=true", "noise=symmetric",
                     "noise.rate=0.2"])
    assert cfg.hydra.job.override_dirname == "method=kd,noise.rate=0.2,noise=symmetric,seed=3"
    assert cfg.hydra.sweep.subdir == cfg.hydra.job.override_dirname


def test_a_sweep_over_such_a_key_keeps_it_in_the_names():
    """logger=csv,tensorboard: two runs of one experiment, told apart by their logger (the
    other keys that do not change the experiment still stay out)."""
    args = name_swept_keys(["-m", "logger=csv,tensorboard", "num_threads=1", "seed=0"])
    job = ["hydra.mode=MULTIRUN", "logger=tensorboard", "num_threads=1", "seed=0", args[-1]]
    assert hydra_cfg(job).hydra.job.override_dirname == "logger=tensorboard,seed=0"
    assert name_swept_keys(["-m", "logger=csv", "seed=0,1"]) == ["-m", "logger=csv", "seed=0,1"]


def test_a_sweeper_optimises_the_selection_metric():
    from omegaconf import OmegaConf

    from kdlab.cli import sweep_objective

    results = {"val": {"acc": 0.9, "nll": 0.31, "ece": 0.05}}
    assert sweep_objective(OmegaConf.create({}), results) == 0.9  # default: val/acc
    cfg = OmegaConf.create({"selection": {"metric": "val/nll"}})
    assert sweep_objective(cfg, results) == 0.31
