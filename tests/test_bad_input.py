"""Bad input through the real CLI: a non-zero exit, ONE line naming the problem and the fix,
no traceback, and nothing earlier (a finished run, the teacher cache) modified."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import run_kdlab

FAST = ["trainer=cpu", "trainer.enable_progress_bar=false", "trainer.max_epochs=1"]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def kdlab(args, cwd, env):
    return run_kdlab("train", *args, cwd=cwd, env=env, check=False)


def snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished CE run (mlp on digits) and a teacher cache entry, made through the CLI."""
    root = tmp_path_factory.mktemp("bad-input")
    env = {"KDLAB_CACHE_DIR": str(root / "cache"), "KDLAB_DATA_DIR": str(root / "data")}
    finished = root / "finished"
    out = kdlab(["method=kd", "student=mlp", "teacher=mlp", *FAST, f"hydra.run.dir={finished}"],
                root, env)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = finished / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    (root / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    marker = root / "payload-ran"
    torch.save({"state_dict": {}, "x": Payload(str(marker))}, root / "evil.ckpt")
    (root / "evil.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    return root, env, finished, ckpt, marker


CASES = {
    # name: (overrides, words the single error line must contain)
    "unknown method": (["method=nope"], ["nope", "kd", "ce"]),
    "unknown model": (["student=nope"], ["nope", "resnet8x4"]),
    "unknown dataset": (["dataset=nope"], ["nope", "digits", "cifar100"]),
    "unknown noise group": (["noise=nope"], ["nope", "symmetric"]),
    "unknown noise type": (["noise.type=nope"], ["nope", "pairflip"]),
    "noise rate > 1": (["noise=symmetric", "noise.rate=1.5"], ["noise.rate", "[0, 1]"]),
    "noise rate < 0": (["noise=symmetric", "noise.rate=-0.1"], ["noise.rate", "[0, 1]"]),
    "meta fraction 0": (["dataset.meta_fraction=0"], ["meta_fraction", "(0, 1)"]),
    "meta fraction 1": (["dataset.meta_fraction=1.0"], ["meta_fraction", "(0, 1)"]),
    "no such key": (["trainer.nope=3"], ["nope", "+trainer.nope"]),
    "teacher ckpt missing": (["teacher.ckpt={root}/missing.ckpt"], ["not found", "teacher.ckpt"]),
    "teacher for other classes/arch": (
        ["dataset=synthetic", "student=mlp", "teacher=mlp", "teacher.ckpt={ckpt}"],
        ["classifier.weight", "(10, 128)", "(20, 128)"]),
    "truncated ckpt": (["teacher=mlp", "teacher.ckpt={root}/truncated.ckpt"], ["truncated"]),
    "code-executing pickle (torch)": (["teacher.ckpt={root}/evil.ckpt"],
                                      ["refusing", "allow_pickle"]),
    "code-executing pickle (plain)": (["teacher.ckpt={root}/evil.pkl"], ["refusing"]),
    "dataset missing, download off": (
        ["dataset=cifar10", "dataset.download=false", "student=resnet8", "method=ce"],
        ["cifar-10-batches-py", "dataset.download=true"]),
    "finished run directory": (["method=ce", "hydra.run.dir={finished}"],
                               ["already holds a finished run"]),
    "loss becomes nan": (["method=ce", "method.weight=nan"], ["'ce'", "nan", "step 0"]),
    "value of the wrong type": (["method=kd", "method.temperature=hot"],
                                ["method", "hot"]),
    "unknown teacher cache mode": (["teacher_cache=bogus"], ["teacher_cache", "bogus", "disk"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, world):
    root, env, finished, ckpt, marker = world
    overrides, words = CASES[case]
    args = [a.format(root=root, ckpt=ckpt, finished=finished) for a in overrides]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={root / 'runs' / re.sub(r'[^a-z0-9]+', '_', case)}")
    before = snapshot(finished, root / "cache")
    out = kdlab([*FAST, *args], root, env)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.startswith("kdlab: error:")]
    assert len(errors) == 1, out.stderr[-2000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    assert "Traceback" not in out.stderr + out.stdout
    assert snapshot(finished, root / "cache") == before
    assert not marker.exists()
