"""``kdlab data prepare`` (kdlab/data/prepare.py) and dataset=streaming
(kdlab/data/streaming.py): the chunks hold every file's bytes at its id, an interrupted
prepare ends with the chunks of an uninterrupted one, the streamed splits are
imagefolder's, epochs depend on (seed, epoch) only, object-store URLs, and the chunks
refused before training."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import cli
from helpers.images import write_tree
from PIL import Image

from kdlab.data.download import DatasetError
from kdlab.data.imagefolder import ImageFolderDataModule
from kdlab.data.prepare import MANIFEST, prepare
from kdlab.data.streaming import StreamingDataModule

litdata = pytest.importorskip("litdata")

SMALL = {"crop_size": 12, "resize_size": 16, "num_workers": 0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """A 4 x 40 tree with one PNG, and its chunks (2 workers, chunks of ~4 KB)."""
    root = tmp_path_factory.mktemp("streaming")
    tree = root / "tree"
    files = write_tree(tree, classes=4, per_class=40, size=16)
    png = tree / "class2" / "img007.JPEG"  # a PNG behind a .JPEG name, as ImageNet has one
    Image.open(png).save(buffer := io.BytesIO(), format="PNG")
    png.write_bytes(buffer.getvalue())
    prepare(tree, root / "out", workers=2, chunk_bytes="4KB", show_progress=False)
    return tree, root / "out", files


def streaming(out, cache: Path | None = None, **kwargs) -> StreamingDataModule:
    dm = StreamingDataModule(path=str(out), cache_dir=str(cache or Path(out).parent / "cache"),
                             **{**SMALL, **kwargs})
    dm.check()
    dm.setup()
    return dm


def test_the_chunks_hold_each_file_at_its_id(prepared):
    tree, out, files = prepared
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["format"], manifest["version"]) == ("kdlab-image-chunks", 1)
    assert manifest["classes"] == ["class0", "class1", "class2", "class3"]
    assert manifest["files"] == files and manifest["num_examples"] == 160
    assert manifest["labels"] == [int(f[5]) for f in files]
    png_id = files.index("class2/img007.JPEG")
    assert manifest["reencoded"] == [png_id]
    assert manifest["num_chunks"] > 4  # both workers wrote several
    items = litdata.StreamingDataset(str(out))
    for i in range(160):
        item = items[i]
        assert (item["id"], item["label"]) == (i, manifest["labels"][i])
        if i != png_id:
            assert item["jpeg"] == (tree / files[i]).read_bytes()
    assert item is not None and items[png_id]["jpeg"][:3] == b"\xff\xd8\xff"  # now a JPEG
    assert not (out / ".kdlab-prepare.json").exists()


def test_streamed_splits_and_eval_batches_are_imagefolders(prepared):
    tree, out, _ = prepared
    stream, folder = streaming(out, seed=4), ImageFolderDataModule(path=str(tree), seed=4,
                                                                   **SMALL)
    folder.setup()
    for split in ("train", "meta", "val", "test"):
        assert torch.equal(stream.splits[split].ids, folder.splits[split].ids), split
        assert torch.equal(stream.splits[split].targets, folder.splits[split].targets), split
    a = [stream.model_batch(b, "cpu") for b in stream.val_dataloader()]
    b = [folder.model_batch(b, "cpu") for b in folder.val_dataloader()]
    for key in ("id", "index", "target", "input"):
        assert torch.equal(torch.cat([x[key] for x in a]), torch.cat([x[key] for x in b])), key


def test_each_epoch_streams_every_train_example_once_in_its_own_order(prepared):
    _, out, _ = prepared
    dm = streaming(out, seed=1, batch_size=19)  # 114 train rows: 6 full batches
    loader = dm.train_dataloader()
    epochs = []
    for e in range(2):
        loader.epoch_of = lambda e=e: e
        epochs.append([dm.model_batch(b, "cpu", train=True) for b in loader])
    for batches in epochs:
        rows = torch.cat([b["index"] for b in batches])
        assert sorted(rows.tolist()) == list(range(114))
        ids = torch.cat([b["id"] for b in batches])
        assert torch.equal(dm.splits["train"].ids[rows], ids)
    assert not torch.equal(epochs[0][0]["id"], epochs[1][0]["id"])
    # a new loader asked for epoch 1 (a resumed run) streams epoch 1 again, views included
    fresh = streaming(out, seed=1, batch_size=19).train_dataloader()
    fresh.epoch_of = lambda: 1
    for a, b in zip(epochs[1], fresh, strict=True):
        b = dm.model_batch(b, "cpu", train=True)
        assert torch.equal(a["id"], b["id"]) and torch.equal(a["input"], b["input"])


def test_an_object_store_url_reads_the_same_chunks(prepared, tmp_path):
    _, out, _ = prepared
    local = streaming(out, seed=0)
    # LitData's stand-in for s3:// and the like: chunks downloaded into the cache
    remote = streaming(f"local:{out}", cache=tmp_path / "cache", seed=0)
    assert remote.catalog().classes == local.catalog().classes
    a = next(iter(local.val_dataloader()))
    b = next(iter(remote.val_dataloader()))
    assert torch.equal(a["input"], b["input"]) and torch.equal(a["id"], b["id"])
    assert list((tmp_path / "cache" / "chunks").rglob("chunk-*.bin"))


def test_a_killed_prepare_continues_into_the_chunks_of_an_uninterrupted_one(tmp_path):
    tree = tmp_path / "tree"
    write_tree(tree, classes=3, per_class=30, size=16)
    reference = tmp_path / "reference"
    prepare(tree, reference, workers=1, chunk_bytes="4KB", show_progress=False)
    out = tmp_path / "out"
    # a prepare whose items from id 40 on never finish: killed (with its worker) once LitData
    # has checkpointed the chunks before them
    script = (
        "import sys, time\n"
        "import kdlab.data.prepare as p\n"
        "real = p.prepared_item\n"
        "def stuck(entry):\n"
        "    if entry[0] >= 40:\n"
        "        time.sleep(600)\n"
        "    return real(entry)\n"
        "p.prepared_item = stuck\n"
        f"p.prepare({str(tree)!r}, {str(out)!r}, workers=1, chunk_bytes='4KB',"
        " show_progress=False)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / ".checkpoints" / "checkpoint-0.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if checkpoint.is_file() and json.loads(checkpoint.read_text())["samples_written"] > 20:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / MANIFEST).exists() and (out / ".kdlab-prepare.json").exists()
    again = cli("data", "prepare", str(tree), str(out), "--workers", "4", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "continuing the interrupted prepare" in again.stderr  # with its 1 worker
    chunks = sorted(p.name for p in reference.glob("chunk-*.bin"))
    assert chunks == sorted(p.name for p in out.glob("chunk-*.bin")) and len(chunks) > 3
    for name in chunks:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    index = [json.loads((d / "index.json").read_text())["chunks"] for d in (reference, out)]
    assert index[0] == index[1]
    ours = [json.loads((d / MANIFEST).read_text()) for d in (reference, out)]
    assert ours[0] == ours[1]


# -- refused before training -------------------------------------------------------------------


def test_chunks_that_are_not_a_finished_prepare_of_this_version_are_refused(prepared, tmp_path):
    _, out, _ = prepared
    with pytest.raises(DatasetError, match="does not exist; prepare them with: kdlab data "
                                           "prepare SOURCE"):
        StreamingDataModule(path=str(tmp_path / "nothing")).check()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="holds no prepared chunks"):
        StreamingDataModule(path=str(empty)).check()
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / ".kdlab-prepare.json").write_text("{}")
    with pytest.raises(DatasetError, match="unfinished prepare: run the same kdlab data "
                                           "prepare again"):
        StreamingDataModule(path=str(unfinished)).check()
    older = tmp_path / "older"
    older.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (older / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((older / MANIFEST).read_text())
    (older / MANIFEST).write_text(json.dumps({**manifest, "version": 0}))
    with pytest.raises(DatasetError, match="format kdlab-image-chunks version 0; this kdlab "
                                           "reads kdlab-image-chunks version 1"):
        StreamingDataModule(path=str(older), cache_dir=str(tmp_path / "c")).check()
    (older / MANIFEST).write_text(json.dumps({**manifest, "num_examples": 159,
                                              "labels": manifest["labels"][:159],
                                              "files": manifest["files"][:159]}))
    with pytest.raises(DatasetError, match="its chunks hold 160 items, its kdlab.json 159"):
        StreamingDataModule(path=str(older), cache_dir=str(tmp_path / "c")).check()


def test_bad_chunks_stop_kdlab_train_in_one_line_with_no_run_directory(tmp_path):
    (tmp_path / "chunks").mkdir()
    run_dir = tmp_path / "run"
    out = cli("train", "dataset=streaming", f"dataset.path={tmp_path / 'chunks'}",
              "student=resnet8", "teacher=resnet8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert out.returncode == 1
    assert out.error_lines == [f"kdlab: error: dataset.path {tmp_path / 'chunks'} holds no "
                               f"prepared chunks (no kdlab.json); prepare them with: kdlab "
                               f"data prepare SOURCE {tmp_path / 'chunks'}"]
    assert not run_dir.exists()


def test_prepare_refuses_a_bad_tree_or_a_foreign_out(tmp_path):
    (tmp_path / "empty").mkdir()
    out = cli("data", "prepare", str(tmp_path / "empty"), str(tmp_path / "o1"), cwd=tmp_path)
    assert out.returncode == 1 and len(out.error_lines) == 1
    assert "has no class folders" in out.error_lines[0] and not (tmp_path / "o1").exists()
    tree = tmp_path / "tree"
    write_tree(tree, classes=2, per_class=2)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    out = cli("data", "prepare", str(tree), str(tmp_path / "busy"), cwd=tmp_path)
    assert out.returncode == 1 and "is not empty and holds no prepare of kdlab's" in \
        out.error_lines[0]
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]
