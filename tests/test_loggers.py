"""Dashboards: wandb (offline, end to end and in-process), tensorboard, csv.

The wandb offline run file (``run-<id>.wandb``) is read back record by record, so the test
checks what would be uploaded: run name/group/project, config, history, images, summary.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import matplotlib
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from kdlab.config import compose
from kdlab.errors import ConfigError
from kdlab.loggers import build_loggers, close_loggers, finalize_loggers, wandb_group_and_name

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TINY = ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "num_threads=1"]
FAKE_KEY = "kdlabtest" + "0123456789abcdef" * 2  # looks like a key, never valid


def wandb_env(root: Path) -> dict[str, str]:
    """Offline wandb with a fake key, every wandb directory inside the test's tmp dir."""
    return {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY,
            "WANDB_CONFIG_DIR": str(root / "wandb-config"),
            "WANDB_CACHE_DIR": str(root / "wandb-cache"),
            "WANDB_DATA_DIR": str(root / "wandb-data")}


def wandb_records(run_dir: Path) -> list:
    """The records of a wandb offline run: its ``.wandb`` file is a LevelDB-style log
    (7-byte file header; 32 KiB blocks of chunks with a 7-byte header: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        room = block - pos % block
        kind = data[pos + 6] if room >= 7 else 0
        if kind == 0:  # block trailer or zero padding
            pos += room
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def of_kind(records: list, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def settled_records(run_dir: Path, done=lambda records: True, timeout: float = 60.0) -> list:
    """wandb's service process writes the offline file asynchronously: under load the last
    records can land a moment after ``finish()`` returns, so poll until ``done``."""
    import time

    deadline = time.time() + timeout
    while True:
        records = wandb_records(run_dir)
        if done(records) or time.time() > deadline:
            return records
        time.sleep(0.5)


def summary_of(records: list) -> dict:
    summary: dict = {}
    for s in of_kind(records, "summary"):
        for item in s.update:
            *parents, key = list(item.nested_key) or [item.key]
            node = summary
            for parent in parents:
                node = node.setdefault(parent, {})
            node[key] = json.loads(item.value_json)
    return summary


# -- end to end --------------------------------------------------------------------------------


def test_wandb_offline_and_tensorboard_csv_end_to_end(tmp_path, kdlab_cli):
    sweep = tmp_path / "sweep"
    out = kdlab_cli("train", "-m", "logger=wandb,[csv,tensorboard]", "seed=2", *TINY,
                    f"hydra.sweep.dir={sweep}", cwd=tmp_path, cache=tmp_path / "cache",
                    env=wandb_env(tmp_path))
    wandb_job, tb_job = sorted(d for d in sweep.iterdir() if d.is_dir())
    results = json.loads((wandb_job / "results.json").read_text())

    # wandb: everything in <run dir>/wandb/offline-run-*/, no network needed
    (offline,) = (wandb_job / "wandb").glob("offline-run-*")
    records = wandb_records(offline)
    (run,) = of_kind(records, "run")
    assert run.project == "kdlab"
    assert run.run_group == f"{tmp_path.name}/sweep"  # the multirun's sweep dir
    assert run.display_name.startswith("method=kd,logger=wandb,") and \
        run.display_name.endswith(",seed=2")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["method"]["_target_"] == "kdlab.methods.kd.KD" and config["seed"] == 2
    history_keys = {item.key or "/".join(item.nested_key)
                    for h in of_kind(records, "history") for item in h.item}
    assert {"train/loss_ce", "train/loss_kd", "val/acc", "val/ece", "test/acc",
            "teacher0/test/acc"} <= history_keys
    summary = summary_of(records)
    assert summary["test"] == results["test"] and summary["method"] == "kd"
    assert summary["teachers"] == results["teachers"]
    assert summary["plots/reliability_test"]["_type"] == "images/separated"
    assert list((offline / "files" / "media" / "images" / "plots").glob("reliability_test*.png"))
    assert of_kind(records, "exit")[0].exit_code == 0
    assert not (wandb_job / "tensorboard").exists() and not (wandb_job / "logs").exists()

    # csv + tensorboard in the other job
    header = (tb_job / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss_ce", "train/loss_kd", "val/acc", "test/acc"} <= set(header)
    tags = tensorboard_tags(tb_job / "tensorboard")
    assert {"val/acc", "train/loss_kd", "test/acc", "hparams/test_acc"} <= set(tags["scalars"])
    assert "plots/reliability_test" in tags["images"] and tags["hparams"]
    assert not (tb_job / "wandb").exists()

    # the API key (only in the environment) is written nowhere
    for path in tmp_path.rglob("*"):
        if path.is_file():
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


# -- in-process --------------------------------------------------------------------------------


def test_wandb_logger_settings_outside_a_hydra_app(tmp_path):
    cfg = compose(["logger=wandb", "seed=3"])
    (logger,) = build_loggers(cfg, tmp_path / "my-run")
    init = logger._wandb_init  # what WandbLogger hands to wandb.init
    assert init["project"] == "kdlab" and init["group"] is None
    assert init["name"] == "my-run,seed=3" and init["dir"] == str(tmp_path / "my-run")
    assert init["config"]["method"]["_target_"] == "kdlab.methods.kd.KD"
    assert init["config"]["seed"] == 3
    cfg = compose(["logger=wandb", "logger.wandb.group=ablation", "logger.wandb.name=mine"])
    (logger,) = build_loggers(cfg, tmp_path / "other")
    assert logger._wandb_init["group"] == "ablation" and logger._wandb_init["name"] == "mine"
    with pytest.raises(ConfigError, match="WANDB_API_KEY"):
        build_loggers(compose(["logger=wandb", "+logger.wandb.api_key=abc"]), tmp_path)


def test_wandb_names_inside_a_sweep(tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module("kdlab.conf", version_base="1.3"):
        cfg = hydra_compose("train", return_hydra_config=True, overrides=[
            "hydra.mode=MULTIRUN", "hydra.sweep.dir=multirun/2026-01-02/03-04-05", "seed=1"])
    cfg.hydra.job.override_dirname = "noise.rate=0.4"  # Hydra sets it per job when launching
    try:
        HydraConfig.instance().set_config(cfg)
        assert wandb_group_and_name(cfg, tmp_path) == (
            "2026-01-02/03-04-05", "method=kd,noise.rate=0.4,seed=1")
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


def test_wandb_offline_finalize_images_summary_and_failed_runs(tmp_path, monkeypatch):
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    cfg = compose(["logger=wandb"])
    done, failed, stale, fresh = (tmp_path / name for name in ("done", "failed", "stale", "fresh"))
    for d in (done, failed, stale, fresh):
        d.mkdir()
    _plots(done)
    (logger,) = build_loggers(cfg, done)
    logger.log_metrics({"train/loss_kd": 0.3}, step=0)
    finalize_loggers([logger], cfg, RESULTS, done)
    records = settled_records(next((done / "wandb").glob("offline-run-*")),
                              lambda r: bool(of_kind(r, "exit")) and "test" in summary_of(r))
    summary = summary_of(records)
    assert summary["test"] == RESULTS["test"] and summary["train/loss_kd"] == 0.3
    assert {"plots/reliability_test", "plots/alm_mixing_weights"} <= set(summary)
    assert of_kind(records, "exit")[0].exit_code == 0
    # a failed run is closed as failed (close_loggers) ...
    (logger,) = build_loggers(cfg, failed)
    logger.log_metrics({"train/loss_kd": 0.3}, step=0)
    close_loggers([logger])
    records = settled_records(next((failed / "wandb").glob("offline-run-*")),
                              lambda r: bool(of_kind(r, "exit")))
    assert of_kind(records, "exit")[0].exit_code == 1
    # ... and a run left open by a failed job is finished before the next job's logger starts
    (logger,) = build_loggers(cfg, stale)
    logger.log_metrics({"train/loss_kd": 0.3}, step=0)
    (next_logger,) = build_loggers(cfg, fresh)
    next_logger.log_metrics({"train/loss_kd": 0.2}, step=0)
    assert next_logger.experiment.id != logger.experiment.id
    close_loggers([next_logger])
    records = settled_records(next((stale / "wandb").glob("offline-run-*")),
                              lambda r: bool(of_kind(r, "exit")))
    assert of_kind(records, "exit")[0].exit_code == 1
    assert isinstance(next_logger, WandbLogger)
