"""scripts/experiments.py and scripts/method_zoo.py: with ``train=False`` (``--finished-only``)
the tables come from the runs that have finished and nothing is trained."""

from __future__ import annotations

import json

import pytest
from helpers.scripts import loaded_script

from kdlab.config import compose


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The scripts' --work; run_one points the cache into it (a part of the config, so of the
    run's key): the same here, and restored after the test."""
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "work" / "cache"))
    return tmp_path / "work"


@pytest.fixture
def experiments(work, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield from loaded_script("experiments")


@pytest.fixture
def zoo(experiments):
    yield from loaded_script("method_zoo")


def finish(experiments, work, overrides, acc):
    """Write the results.json of a finished run where execute looks for it."""
    run_dir = work / "runs" / experiments.run_key(compose([*experiments.COMMON, *overrides]))
    run_dir.mkdir(parents=True)
    results = {"val": {"acc": acc}, "test": {"acc": acc, "ece": 0.02, "nll": 0.3},
               "wall_time_s": 60.0,
               "teachers": [{"name": "teacher_net", "test": {"acc": 0.95, "ece": 0.01,
                                                             "nll": 0.2}}]}
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_finished_runs_are_returned_and_the_others_not_trained(experiments, work, capsys):
    runs = [experiments.Run({"seed": s}, ["dataset=digits", "method=kd", f"seed={s}"])
            for s in (0, 1)]
    run_dir = finish(experiments, work, runs[0].overrides, 0.9)
    done = experiments.execute(runs, work, jobs=2, train=False)
    assert done == [runs[0]] and done[0].results["test"]["acc"] == 0.9
    assert done[0].run_dir == str(run_dir)
    assert sorted(p.name for p in (work / "runs").iterdir()) == [run_dir.name]  # no new run
    assert "1 of 2 runs finished" in capsys.readouterr().out
    # a run that cannot even be composed is an error, not "not finished yet"
    with pytest.raises(Exception, match="no_such_method"):
        experiments.execute([experiments.Run({}, ["method=no_such_method"])], work, train=False)


def test_the_zoo_table_so_far(zoo, experiments, work, tmp_path):
    out = tmp_path / "out"
    cache_hint = f"teacher_cache_runs={len(zoo.shipped_methods())}"  # as the zoo plans runs
    for method, accs in (("kd", (0.90, 0.94)), ("ce", (0.89, 0.91))):
        for seed, acc in enumerate(accs):
            finish(experiments, work,
                   ["dataset=digits", f"method={method}", f"seed={seed}", cache_hint], acc)
    zoo.main(["--dataset", "digits", "--methods", "kd", "ce", "dkd", "--seeds", "0", "1",
              "--finished-only", "--work", str(work), "--out", str(out), "--tag", "t"])
    table = (out / "zoo_digits_t.md").read_text()
    assert "nothing trained" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()
            if line.startswith("| ") and "---" not in line}
    # the teacher, then the baseline and KD (dkd: none finished, no row)
    assert list(rows) == ["row", "teacher (teacher_net, CE)", "ce", "kd"]
    # kd: n = 2, mean 92.00, sample std of (90, 94) = 2.83; minus ce paired by seed:
    # d = (1, 3), mean 2, sd sqrt(2), se 1, t_{0.975, 1} = 12.706 -> [-10.71, +14.71]
    assert rows["kd"].startswith("| kd | 2 | **92.00 ± 2.83** | +2.00 [-10.71, +14.71] | ")
    assert rows["ce"].startswith("| ce | 2 | 90.00 ± 1.41 |  | ")
    assert not any((work / "runs").glob("*/checkpoints"))

    with pytest.raises(SystemExit, match="none of the 2 runs has finished"):
        zoo.main(["--dataset", "digits", "--methods", "dkd", "--seeds", "0", "1",
                  "--finished-only", "--work", str(work), "--out", str(out)])


def test_a_resolved_difference_is_marked(zoo):
    """Three seeds, d = (1.0, 1.2, 1.4) points: mean 1.2, sd 0.2, se 0.2 / sqrt(3),
    t_{0.975, 2} = 4.303 -> 1.2 +/- 0.497 = [+0.70, +1.70], excludes 0."""
    base = {"row": "ce", "acc_by_seed": {0: 0.900, 1: 0.910, 2: 0.905}}
    row = {"row": "kd", "acc_by_seed": {0: 0.910, 1: 0.922, 2: 0.919}}
    assert zoo.difference(row, base) == "+1.20 [+0.70, +1.70] *"
    assert zoo.difference(base, base) == ""
    assert zoo.difference({"row": "teacher"}, base) == ""
    # one baseline run: the difference of the means alone, 91.70 - 90.00
    assert zoo.difference(row, {"row": "ce", "acc_by_seed": {0: 0.9}}) == "+1.70"
