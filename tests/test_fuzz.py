"""Random override combinations against a real oracle: ``kdlab.config.validate`` decides
valid or invalid without running anything; a valid draw must then train to the end, an
invalid one must be refused by ``run`` with a one-line KdlabError and leave no run dir."""

from __future__ import annotations

import itertools
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdlab.config import compose, conf_dir
from kdlab.errors import KdlabError
from kdlab.pipeline import run
from kdlab.preflight import validate

counter = itertools.count()

draws = st.fixed_dictionaries({
    "method": st.sampled_from(sorted(p.stem for p in (conf_dir() / "method").glob("*.yaml"))),
    "student": st.sampled_from(["mlp", "cnn_small", "cnn"]),
    "teacher": st.sampled_from(["mlp", "cnn_small"]),
    "noise": st.sampled_from(["none", "symmetric", "symmetric_exclusive", "asymmetric",
                              "pairflip"]),
    # valid values drawn more often than invalid ones, so that both kinds occur
    "noise.rate": st.sampled_from([0.0, 0.3, 0.3, 1.0, 1.5, -0.2]),
    "dataset.meta_fraction": st.sampled_from([0.1, 0.1, 0.5, 0.0, 1.2]),
    "dataset.batch_size": st.sampled_from([16, 64, 64, 5000, 0]),
    "seed": st.integers(0, 3),
})


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz-cache")


# KDLAB_FUZZ_EXAMPLES=200 for a longer search than the suite's 6 (each example is a real run).
@settings(max_examples=int(os.environ.get("KDLAB_FUZZ_EXAMPLES", 6)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(chosen=draws)
def test_validate_is_an_oracle_for_run(chosen, tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(shared_cache))
    args = [f"{k}={v}" for k, v in chosen.items()]
    args += ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
             "teacher.max_epochs=1", "num_threads=1"]
    if chosen["method"] == "multi_teacher_kd":
        args.append("teachers=[{model: mlp, hidden: [32], max_epochs: 1}, "
                    "{model: cnn, width: 4, max_epochs: 1}]")
    cfg = compose(args)
    try:
        validate(cfg)
        valid = True
    except KdlabError as e:
        valid, reason = False, str(e)
        assert reason and "\n" not in reason
    out = tmp_path / f"run{next(counter)}"
    if not valid:
        with pytest.raises(KdlabError):
            run(cfg, out)
        assert not out.exists()
        return
    results = run(cfg, out)  # a valid config trains to the end
    assert results["status"] == "finished" and results["epochs"] == 1
    assert (out / "results.json").exists()
