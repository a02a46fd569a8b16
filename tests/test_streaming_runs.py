"""Whole runs on generated JPEGs: ``kdlab data prepare`` then ``kdlab train
dataset=streaming`` killed mid-epoch (SIGKILL) and resumed into the uninterrupted run's
results, an unreadable image counted; two DDP processes that see each example once per
epoch; ALM-KD's per-example state on dataset=imagefolder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import cli, kdlab_process
from helpers.images import truncate, write_tree

from kdlab.config import compose
from kdlab.data.imagefolder import ImageFolderDataModule
from kdlab.data.streaming import StreamingDataModule
from kdlab.models import build_model
from kdlab.pipeline import run

pytest.importorskip("litdata")
TESTS = Path(__file__).resolve().parent
# 4 x 40 train images: 16 meta, 16 val, 128 train = 8 batches of 16 (2 ranks: 4 each); the
# 4 x 5 test images are another prepared tree, as ImageNet's val is
TINY = ["dataset.crop_size=12", "dataset.resize_size=16", "dataset.num_workers=0",
        "dataset.batch_size=16", "student=resnet8", "trainer.enable_progress_bar=false",
        "num_threads=1"]


def prepared_trees(root: Path, broken_train_example: bool = False, seed: int = 0
                   ) -> tuple[Path, Path, str | None]:
    """Trees written and prepared with ``kdlab data prepare``; with
    ``broken_train_example``, the first train example of ``seed``'s split is a truncated
    JPEG (its header reads: only decoding it fails). Returns the chunks and its file."""
    write_tree(root / "tree" / "train", classes=4, per_class=40)
    write_tree(root / "tree" / "val", classes=4, per_class=5, seed=1)
    broken = None
    if broken_train_example:
        folder = ImageFolderDataModule(path=str(root / "tree" / "train"),
                                       test_path=str(root / "tree" / "val"), seed=seed)
        folder.setup()
        broken = folder.catalog().files[int(folder.splits["train"].ids[0])]
        truncate(root / "tree" / "train" / broken)
    for split in ("train", "val"):
        out = cli("data", "prepare", str(root / "tree" / split), str(root / "chunks" / split),
                  "--workers", "1", cwd=root)
        assert out.returncode == 0, out.stderr[-2000:]
    return root / "chunks" / "train", root / "chunks" / "val", broken


def test_a_streaming_run_killed_mid_epoch_resumes_into_the_same_results(tmp_path, monkeypatch):
    train, val, broken = prepared_trees(tmp_path, broken_train_example=True, seed=3)
    env = {"KDLAB_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(TESTS)}
    monkeypatch.setenv("KDLAB_CACHE_DIR", env["KDLAB_CACHE_DIR"])
    # PS-KD: per-example state (the last epoch's predictions of every train row)
    args = ["dataset=streaming", f"dataset.path={train}", f"dataset.test_path={val}", *TINY,
            "method=pskd", "trainer=cpu", "trainer.max_epochs=3", "seed=3",
            "+callbacks.stop={_target_: helpers.callbacks.StopAt, kill: true}"]
    reference = run(compose(args), tmp_path / "reference")
    run_dir = tmp_path / "killed"
    killed = kdlab_process("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path,
                           env={**env, "KDLAB_TEST_STOP_AT_STEP": "12"})  # in epoch 2 of 3
    assert killed.returncode == -9
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert not (run_dir / "results.json").exists()
    resumed = cli("train", *args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                  env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("test", "test_last", "val", "best_epoch", "selection", "split_sizes"):
        assert results[key] == reference[key], key
    assert results["split_sizes"] == {"train": 128, "meta": 16, "val": 16, "test": 20}
    # the truncated JPEG passed the checks (its header is fine) and was counted in training
    expected = {"unreadable": 1, "unreadable_files": [str(tmp_path / "tree" / "train" / broken)]}
    assert results["data"] == reference["data"] == expected


def test_two_ddp_processes_stream_each_example_once_per_epoch(tmp_path):
    train, val, _ = prepared_trees(tmp_path)
    run_dir = tmp_path / "ddp"
    out = kdlab_process("train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                        "trainer.max_epochs=1", "dataset=streaming", f"dataset.path={train}",
                        f"dataset.test_path={val}", *TINY, "method=pskd", "seed=5",
                        "+callbacks.digest={_target_: helpers.callbacks.RankDigest}",
                        "+callbacks.seen={_target_: helpers.callbacks.SeenIds}",
                        f"hydra.run.dir={run_dir}", cwd=tmp_path,
                        env={"KDLAB_CACHE_DIR": str(tmp_path / "cache"),
                             "PYTHONPATH": str(TESTS)})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = [json.loads((run_dir / "ranks" / f"ids_rank{r}.json").read_text())["0"]
            for r in (0, 1)]
    dm = StreamingDataModule(path=str(train), test_path=str(val), seed=5,
                             cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert len(seen[0]) == len(seen[1]) == 64  # 4 batches of 16 each
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(dm.splits["train"].ids.tolist())
    # weights and PS-KD's memory (gathered from both ranks every step) agree
    ranks = [json.loads((run_dir / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["state_sha256"] == ranks[1]["state_sha256"]
    results = json.loads((run_dir / "results.json").read_text())
    # each rank evaluated its own half of val, and the metrics were synced over all 16
    assert results["split_sizes"]["val"] == 16 and results["data"]["unreadable"] == 0


def test_alm_kd_learns_its_per_example_weights_on_an_image_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    write_tree(tree, classes=4, per_class=40)
    teacher = tmp_path / "teacher.pt"
    torch.manual_seed(0)
    torch.save(build_model("resnet8", 4, (3, 12, 12)).state_dict(), teacher)
    results = run(compose(["dataset=imagefolder", f"dataset.path={tree}", *TINY,
                           "teacher=resnet8", f"teacher.ckpt={teacher}", "method=alm_kd",
                           "method.meta_start=1", "method.meta_every=1", "noise=symmetric",
                           "noise.rate=0.3", "trainer=cpu", "trainer.max_epochs=2"]),
                  tmp_path / "run")
    # one meta pass over the 114 train rows (read by row), scored on the 15 meta examples
    assert results["mixing"]["meta_passes"] == 1
    assert results["split_sizes"] == {"train": 114, "meta": 15, "val": 15, "test": 16}
    assert results["noise"]["realised_rate"] > 0
