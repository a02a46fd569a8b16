"""Random but type-valid override combinations: every run completes or stops with a
user-facing KdlabError (one clean line in the CLI), never another exception."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdlab.config import compose
from kdlab.errors import KdlabError
from kdlab.train import run

counter = itertools.count()

overrides = st.fixed_dictionaries({
    "method": st.sampled_from(["ce", "kd", "dkd", "pld", "taid", "pskd", "multi_teacher_kd",
                               "alm_kd", "fitnet"]),
    "student": st.sampled_from(["mlp", "cnn_small", "cnn"]),
    "teacher": st.sampled_from(["mlp", "cnn_small"]),
    "noise": st.sampled_from(["none", "symmetric", "symmetric_exclusive", "asymmetric",
                              "pairflip"]),
    "noise.rate": st.sampled_from([0.0, 0.3, 1.0, 1.5, -0.2]),
    "dataset.meta_fraction": st.sampled_from([0.1, 0.5, 0.0, 1.2]),
    "dataset.batch_size": st.sampled_from([16, 64, 5000]),
    "seed": st.integers(0, 3),
})


@settings(max_examples=16, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=overrides)
def test_runs_complete_or_fail_cleanly(chosen, tmp_path, monkeypatch):
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    args = [f"{k}={v}" for k, v in chosen.items()]
    args += ["trainer=cpu", "trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    if chosen["method"] == "multi_teacher_kd":
        args.append("teachers=[{name: mlp, hidden: [32], ckpt: auto}, "
                    "{name: cnn, width: 4, ckpt: auto}]")
    out = tmp_path / f"run{next(counter)}"
    try:
        results = run(compose(args), out)
    except KdlabError as e:
        assert str(e) and "\n" not in str(e)
        assert (out / "failed.json").exists() or not out.exists()
        return
    assert 0.0 <= results["test"]["acc"] <= 1.0
    assert (out / "results.json").exists()
