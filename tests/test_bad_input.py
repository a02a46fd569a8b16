"""Bad input through the `kdlab` command (in-process): a non-zero exit, ONE line naming the
problem and the fix, no traceback, nothing earlier modified (a finished run, the teacher
cache), and -- for everything a config check can see -- no run directory created at all."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from helpers.cifar import LocalServer
from helpers.cli import cli

FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=1"]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished KD run (mlp on digits) and a teacher cache entry."""
    root = tmp_path_factory.mktemp("bad-input")
    env = {"KDLAB_CACHE_DIR": str(root / "cache"), "KDLAB_DATA_DIR": str(root / "data")}
    finished = root / "finished"
    out = cli("train", "method=kd", "student=mlp", "teacher=mlp", "teacher.max_epochs=1", *FAST,
              f"hydra.run.dir={finished}", cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = finished / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    marker = root / "payload-ran"
    torch.save({"state_dict": {}, "x": Payload(str(marker))}, root / "evil.ckpt")
    (root / "evil.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    return root, env, finished, ckpt, marker


# name: (overrides, words the single error line must contain, caught before anything exists)
CASES = {
    "unknown method": (["method=nope"], ["nope", "kd", "ce"], True),
    "unknown model": (["student=nope"], ["nope", "resnet8x4"], True),
    "unknown dataset": (["dataset=nope"], ["nope", "digits", "cifar100"], True),
    "unknown noise group": (["noise=nope"], ["nope", "symmetric"], True),
    "unknown noise type": (["noise.type=nope"], ["nope", "pairflip"], True),
    "noise rate > 1": (["noise=symmetric", "noise.rate=1.5"], ["noise.rate", "[0, 1]"], True),
    "noise rate < 0": (["noise=symmetric", "noise.rate=-0.1"], ["noise.rate", "[0, 1]"], True),
    "noise rate without a type": (["noise.rate=0.4"], ["noise=none", "noise=symmetric"], True),
    "meta fraction 0": (["dataset.meta_fraction=0"], ["meta_fraction", "(0, 1)"], True),
    "meta fraction 1": (["dataset.meta_fraction=1.0"], ["meta_fraction", "(0, 1)"], True),
    "no such key": (["trainer.nope=3"], ["unknown key trainer.nope", "max_epochs"], True),
    "misspelled key": (["optimizer.learning_rate=0.1"], ["did you mean optimizer.lr?"], True),
    "misspelled added key": (["+optimizer.learning_rate=0.1"], ["did you mean optimizer.lr?"],
                             True),
    "trainer extra that is no Trainer argument": (
        ["+trainer.max_epoch=3"], ["did you mean trainer.max_epochs?"], True),
    "teacher ckpt missing": (["teacher.ckpt={root}/missing.ckpt"], ["not found", "teacher.ckpt"],
                             True),
    "wandb without a key": (["logger=wandb"], ["WANDB_MODE=offline", "wandb login"], True),
    "teacher for other classes/arch": (
        ["dataset=synthetic", "student=mlp", "teacher=mlp", "teacher.ckpt={ckpt}"],
        ["classifier.weight", "(10, 128)", "(20, 128)"], False),
    "truncated ckpt": (["teacher=mlp", "teacher.ckpt={root}/truncated.ckpt"], ["truncated"],
                       False),
    "code-executing pickle (torch)": (["teacher.ckpt={root}/evil.ckpt"],
                                      ["refusing", "allow_pickle"], False),
    "code-executing pickle (plain)": (["teacher.ckpt={root}/evil.pkl"], ["refusing"], False),
    "dataset missing, download off": (
        ["dataset=cifar10", "dataset.download=false", "method=ce"],
        ["cifar-10-batches-py", "dataset.download=true"], True),
    "finished run directory": (["method=ce", "hydra.run.dir={finished}"],
                               ["already holds a finished run"], None),
    "finished run directory, resumed with another config": (
        ["method=ce", "student=mlp", "resume=true", "hydra.run.dir={finished}"],
        ["resume=true with another config than the run in", "differs in: ", "method"], None),
    "loss becomes nan": (["method=ce", "method.weight=nan"], ["'ce'", "nan", "step 0",
                                                             "(epoch 1)"], False),
    "value of the wrong type": (["method=kd", "method.temperature=hot"],
                                ["method.temperature must be a number, got 'hot'"], True),
    "integer setting given a fraction": (["method=dkd", "method.warmup_epochs=2.5"],
                                         ["method.warmup_epochs must be an integer, got 2.5"],
                                         True),
    "unknown teacher cache mode": (["teacher_cache=bogus"], ["teacher_cache", "bogus", "disk"],
                                   True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world):
    root, env, finished, ckpt, marker = world
    overrides, words, early = CASES[case]
    args = [a.format(root=root, ckpt=ckpt, finished=finished) for a in overrides]
    run_dir = root / "runs" / re.sub(r"[^a-z0-9]+", "_", case)
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={run_dir}")
    before = snapshot(finished, root / "cache")
    out = cli("train", *FAST, *args, cwd=root, env={**env, "WANDB_MODE": "", "NETRC": "/none"})
    assert out.returncode == 1
    assert len(out.error_lines) == 1, out.stderr[-2000:]
    for word in words:
        assert word in out.error_lines[0], (word, out.error_lines[0])
    assert "Traceback" not in out.stderr + out.stdout
    assert snapshot(finished, root / "cache") == before
    assert not marker.exists()
    if early:
        assert not run_dir.exists()


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    """An HTTP server on 127.0.0.1 that has no archive: every download fails with 404."""
    server = LocalServer(tmp_path_factory.mktemp("no-archives"))
    yield server
    server.close()


def test_a_failed_download_creates_no_run_directory(world, empty_server):
    root, env, *_ = world
    url = empty_server.url("cifar-10-python.tar.gz")
    args = [*FAST, "dataset=cifar10", f"+dataset.url={url}", "method=ce"]
    run_dir = root / "runs" / "failed_download"
    out = cli("train", *args, f"hydra.run.dir={run_dir}", cwd=root, env=env)
    assert out.returncode == 1 and len(out.error_lines) == 1, out.stderr[-2000:]
    assert f"download of {url} failed: HTTP 404" in out.error_lines[0]
    assert not run_dir.exists()


def test_failed_downloads_in_a_sweep_are_one_line_each(world, empty_server):
    """Each job's error on one line (recorded in its failed.json), no traceback, and the
    sweep goes on to its next job; the sweep exits 1."""
    root, env, *_ = world
    url = empty_server.url("cifar-10-python.tar.gz")
    sweep = root / "failed_download_sweep"
    out = cli("train", "-m", *FAST, "dataset=cifar10", f"+dataset.url={url}", "method=ce",
              "seed=0,1", f"hydra.sweep.dir={sweep}", cwd=root, env=env)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert len(out.error_lines) == 2, out.stderr[-3000:]
    failed = sorted(sweep.rglob("failed.json"))
    assert [[p for p in f.parent.name.split(",") if p.startswith("seed=")] for f in failed] \
        == [["seed=0"], ["seed=1"]]
    for line, record in zip(out.error_lines, failed, strict=True):
        error = json.loads(record.read_text())["error"]
        assert error == f"DatasetError: download of {url} failed: HTTP 404 File not found; " \
            f"check the URL, or download it by hand and place it at " \
            f"{root / 'data' / 'cifar10' / 'cifar-10-python.tar.gz'}"
        assert line.endswith(error.removeprefix("DatasetError: "))
