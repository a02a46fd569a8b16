"""The method contract's extensions, end to end on digits: a batch transform that the
teachers see too (no cache), an extra input view, and a trainable peer tested like the student
(generations of students: test_pipeline.py, test_generations.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.context import FakeContext

from kdlab.config import compose
from kdlab.data.digits import DigitsDataModule
from kdlab.module import DistillModule
from kdlab.pipeline import run

HELPERS = Path(__file__).resolve().parent / "helpers" / "conf"
TINY = ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
        "teacher.max_epochs=1", "num_threads=1"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))


def test_a_batch_transform_is_what_the_teachers_see_even_with_a_cache(tmp_path, cache):
    cfg = compose([*TINY, "method=transform_probe", "teacher_cache=memory"], [HELPERS])
    results = run(cfg, tmp_path / "r")
    assert results["probe"]["checked"] == 17  # 1149 train examples / 64, every step checked
    assert results["probe"]["worst"] == 0.0  # the teachers ran on the negated inputs
    assert results["throughput"]["teacher_cache_s"] == 0.0  # and no cache was built


def test_an_extra_input_view_reaches_the_method(tmp_path, cache):
    results = run(compose([*TINY, "method=view_probe"], [HELPERS]), tmp_path / "r")
    assert results["probe"] == {"shapes_ok": 17, "differs": 17}
    from kdlab.errors import ConfigError
    from kdlab.preflight import validate

    with pytest.raises(ConfigError, match="needs image inputs"):
        validate(compose(["dataset=synthetic", "method=view_probe"], [HELPERS]))


def test_a_peer_is_trained_saved_and_tested_like_the_student(tmp_path, cache):
    results = run(compose([*TINY, "method=peer_probe"], [HELPERS]), tmp_path / "r")
    path = results["checkpoints"]["best"]
    module = DistillModule.load_from_checkpoint(path)  # the student; the peer needs setup
    module.method.setup(FakeContext(module.student))
    module.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    peer = module.method.peer
    dm = DigitsDataModule(seed=0)
    dm.setup()
    test = dm.splits["test"]
    with torch.no_grad():
        acc = (peer.eval()(test.inputs).argmax(1) == test.targets).float().mean().item()
    assert results["peers"]["peer"]["acc"] == pytest.approx(acc, abs=1e-6)
    assert results["peers"]["peer"]["acc"] > 0.5  # it was trained, not left at random
