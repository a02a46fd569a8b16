"""Dashboards: wandb (offline: what kdlab hands to wandb.init and to the run), tensorboard,
and the CSV log that every run keeps whatever other loggers it has."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import matplotlib
import pytest
from helpers.cli import cli
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from kdlab.config import compose
from kdlab.errors import ConfigError
from kdlab.loggers import build_loggers, close_loggers, finalize_loggers, wandb_group_and_name
from kdlab.preflight import validate

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TINY = ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "num_threads=1", "teacher.max_epochs=1"]
FAKE_KEY = "kdlabtest" + "0123456789abcdef" * 2  # looks like a key, never valid


@pytest.fixture
def wandb_runs(tmp_path, monkeypatch):
    """Offline wandb with every directory in tmp_path; records each wandb.init call and
    what kdlab logs to the run and how it finishes it."""
    import wandb

    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY,
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    runs: list[dict] = []
    real_init = wandb.init

    def init(**kwargs):
        run = real_init(**kwargs)
        record = {"init": kwargs, "run": run, "logged": {}, "exit_code": None}
        log, finish = run.log, run.finish

        def logged(data, *args, **kw):
            record["logged"].update(data)
            return log(data, *args, **kw)

        def finished(*args, exit_code=None, **kw):
            record["exit_code"] = 0 if exit_code is None else exit_code
            record["summary"] = plain(run.summary)  # what the dashboard will show
            return finish(*args, exit_code=exit_code, **kw)

        run.log, run.finish = logged, finished
        runs.append(record)
        return run

    monkeypatch.setattr(wandb, "init", init)
    return runs, env


def plain(mapping) -> dict:
    """A wandb summary (nested mapping objects) as plain dicts."""
    return {k: plain(mapping[k]) if hasattr(mapping[k], "keys") else mapping[k]
            for k in mapping.keys()}  # noqa: SIM118 (a wandb mapping, not a dict)


def test_wandb_and_tensorboard_in_a_sweep_keep_the_csv_log(tmp_path, wandb_runs):
    runs, env = wandb_runs
    sweep = tmp_path / "sweep"
    out = cli("train", "-m", "logger=wandb,tensorboard", "seed=2", *TINY,
              f"hydra.sweep.dir={sweep}", cwd=tmp_path,
              env={**env, "KDLAB_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr[-2000:]
    tb_job, wandb_job = sorted(d for d in sweep.iterdir() if d.is_dir())  # logger=tensorb...
    results = json.loads((wandb_job / "results.json").read_text())
    (record,) = runs
    init = record["init"]
    assert init["project"] == "kdlab" and init["group"] == f"{tmp_path.name}/sweep"
    assert init["name"] == "method=kd,logger=wandb,seed=2,teacher.max_epochs=1," \
                           "trainer.max_epochs=1,trainer=cpu"
    assert init["config"]["method"]["_target_"] == "kdlab.methods.kd.KD"
    assert init["config"]["seed"] == 2 and init["dir"] == str(wandb_job)
    assert {"train/loss_ce", "train/loss_kd", "val/acc", "val/ece", "test/acc",
            "test_last/acc", "teacher0/test/acc", "plots/reliability_test"} <= set(
        record["logged"])
    summary = record["summary"]
    assert summary["test"] == results["test"] and summary["method"] == "kd"
    # the last value logged of each key, as results.json has it; epochs counted from 1
    assert summary["test/acc"] == results["test"]["acc"]
    assert summary["test_last/acc"] == results["test_last"]["acc"]
    assert summary["epoch"] == results["epochs"] == 1
    assert summary["teachers"][0]["name"] == "cnn"
    assert record["exit_code"] == 0
    assert list((wandb_job / "wandb").glob("offline-run-*"))  # offline: files, no network
    # every run keeps the CSV log that `kdlab report` reads, whatever its other loggers
    for job in (wandb_job, tb_job):
        header = (job / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"train/loss_ce", "train/loss_kd", "val/acc", "test/acc"} <= set(header)
    tags = tensorboard_tags(tb_job / "tensorboard")
    assert {"val/acc", "train/loss_kd", "test/acc", "test_last/acc",
            "hparams/test_acc"} <= set(tags["scalars"])
    # every value of the one epoch says epoch 1 (training, validation and the final tests)
    assert {e.value for e in tensorboard_scalars(tb_job / "tensorboard", "epoch")} == {1.0}
    assert "plots/reliability_test" in tags["images"] and tags["hparams"]
    assert not (tb_job / "wandb").exists() and not (wandb_job / "tensorboard").exists()
    # the API key (only in the environment) is written nowhere
    for path in tmp_path.rglob("*"):
        if path.is_file() and "wandb-" not in str(path):
            assert FAKE_KEY.encode() not in path.read_bytes(), path
    assert FAKE_KEY not in out.stdout + out.stderr


def tensorboard_tags(log_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, set] = {"scalars": set(), "images": set(), "hparams": set()}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tags["scalars"] |= set(acc.Tags()["scalars"])
        tags["images"] |= set(acc.Tags()["images"])
        with contextlib.suppress(KeyError):  # KeyError: no hparams in this event file
            tags["hparams"] |= set(acc.PluginTagToContent("hparams"))
    return tags


def tensorboard_scalars(log_dir: Path, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = []
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            events += acc.Scalars(tag)
    return events


def test_wandb_names_outside_a_hydra_app_and_from_the_config(tmp_path, wandb_runs):
    runs, _ = wandb_runs
    loggers = build_loggers(compose(["logger=wandb", "seed=3"]), tmp_path / "my-run")
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger", "WandbLogger"]
    loggers[1].experiment  # noqa: B018  (starts the wandb run)
    assert runs[-1]["init"]["group"] is None and runs[-1]["init"]["name"] == "my-run,seed=3"
    close_loggers(loggers)
    loggers = build_loggers(compose(["logger=wandb", "logger.wandb.group=ablation",
                                     "logger.wandb.name=mine"]), tmp_path / "other")
    loggers[1].experiment  # noqa: B018
    assert (runs[-1]["init"]["group"], runs[-1]["init"]["name"]) == ("ablation", "mine")
    close_loggers(loggers)


def test_a_key_in_the_config_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="never put a W&B key into a config"):
        validate(compose(["logger=wandb", "+logger.wandb.api_key=abc"]))


def test_wandb_names_inside_a_sweep(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module("kdlab.conf", version_base="1.3"):
        cfg = hydra_compose("train", return_hydra_config=True, overrides=[
            "hydra.mode=MULTIRUN", "hydra.sweep.dir=multirun/2026-01-02/03-04-05", "seed=1"])
    cfg.hydra.job.override_dirname = "noise.rate=0.4"  # Hydra sets it per job when launching
    cfg.hydra.runtime.output_dir = str(tmp_path)
    try:
        HydraConfig.instance().set_config(cfg)
        assert wandb_group_and_name(cfg, tmp_path) == (
            "2026-01-02/03-04-05", "method=kd,noise.rate=0.4,seed=1")
        # another directory is not this Hydra job's run: named like a run outside an app
        assert wandb_group_and_name(cfg, tmp_path / "other") == (None, "other,seed=1")
    finally:
        HydraConfig.instance().cfg = None


def _plots(run_dir: Path) -> None:
    for name in ("reliability_test", "alm_mixing_weights"):
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot([0, 1], [0, 1])
        fig.savefig(run_dir / f"{name}.png")
        plt.close(fig)


RESULTS = {"method": "kd", "test": {"acc": 0.75, "ece": 0.05},
           "test_last": {"acc": 0.7, "ece": 0.06}, "val": {"acc": 0.8}}


def test_finalize_tensorboard_and_csv(tmp_path):
    _plots(tmp_path)
    cfg = compose([])
    tb = TensorBoardLogger(save_dir=tmp_path, name="tensorboard", version="",
                           default_hp_metric=False)
    csv = CSVLogger(save_dir=tmp_path, name="logs", version="")
    for logger in (tb, csv):
        logger.log_metrics({"val/acc": 0.5}, step=0)
    finalize_loggers([tb, csv], cfg, RESULTS, tmp_path)
    tags = tensorboard_tags(tmp_path / "tensorboard")
    assert {"plots/reliability_test", "plots/alm_mixing_weights"} <= tags["images"]
    assert {"hparams/test_acc", "hparams/test_ece", "hparams/test_last_acc"} <= tags["scalars"]
    assert "_hparams_/experiment" in tags["hparams"]
    assert "kdlab.methods.kd.KD" in (tmp_path / "tensorboard" / "hparams.yaml").read_text()
    assert (tmp_path / "logs" / "metrics.csv").is_file()


def test_wandb_finalize_and_failed_runs(tmp_path, wandb_runs):
    runs, _ = wandb_runs
    cfg = compose(["logger=wandb"])
    done, failed, stale, fresh = (tmp_path / name for name in ("done", "failed", "stale", "fresh"))
    for d in (done, failed, stale, fresh):
        d.mkdir()
    _plots(done)
    loggers = build_loggers(cfg, done)
    loggers[1].log_metrics({"train/loss_kd": 0.3}, step=0)
    finalize_loggers(loggers, cfg, RESULTS, done)
    assert runs[-1]["exit_code"] == 0
    assert runs[-1]["summary"]["test"] == RESULTS["test"]
    assert {"plots/reliability_test", "plots/alm_mixing_weights"} <= set(runs[-1]["logged"])
    # a failed run is closed as failed ...
    loggers = build_loggers(cfg, failed)
    loggers[1].log_metrics({"train/loss_kd": 0.3}, step=0)
    close_loggers(loggers)
    assert runs[-1]["exit_code"] == 1
    # ... and a run left open by a failed job is finished before the next job's logger starts
    stale_loggers = build_loggers(cfg, stale)
    stale_loggers[1].log_metrics({"train/loss_kd": 0.3}, step=0)
    stale_run = runs[-1]
    fresh_loggers = build_loggers(cfg, fresh)
    fresh_loggers[1].log_metrics({"train/loss_kd": 0.2}, step=0)
    assert stale_run["exit_code"] == 1 and runs[-1] is not stale_run
    assert runs[-1]["run"].id != stale_run["run"].id
    close_loggers(fresh_loggers)
