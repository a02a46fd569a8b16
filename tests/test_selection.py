"""Model selection (kdlab.selection, the ``selection`` config node): which validated epoch is
"best", with ties broken by a stated rule -- against scripted val histories that tie, and in
real runs whose val history a callback scripts (tests/helpers/callbacks.py ScriptedVal):
best.ckpt holds the chosen epoch's weights, results.json and the summary say which epoch and
why, and a resumed run chooses what the uninterrupted run chooses."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers.callbacks import Interrupted
from helpers.runs import FAST

from kdlab.callbacks import SelectionCheckpoint
from kdlab.config import compose
from kdlab.errors import ConfigError
from kdlab.pipeline import run
from kdlab.selection import VAL_METRICS, Record, SelectionRule

ACC = [0.5, 0.9, 0.9, 0.9, 0.8]
NLL = [1.0, 0.3, 0.2, 0.2, 0.1]


def history(acc, nll):
    return [Record(i + 1, {"val/acc": a, "val/nll": n})
            for i, (a, n) in enumerate(zip(acc, nll, strict=True))]


# (selection config, the epoch chosen from ACC/NLL): epochs 2-4 tie on val/acc, 3-4 also on
# val/nll; epoch 5 has the lowest val/nll; epoch 1 the lowest val/acc
RULES = [
    (None, 4),  # the default: val/acc, then the lower val/nll, then the later epoch
    ({"tie_break": ["val/nll", "first"]}, 3),
    ({"tie_break": ["val/nll"]}, 3),  # a full tie keeps the earlier epoch
    ({"tie_break": []}, 2),
    ({"tie_break": ["last"]}, 4),
    ({"metric": "val/nll", "tie_break": []}, 5),  # NLL: lower is better
    ({"metric": "val/acc", "mode": "min"}, 1),
]


@pytest.mark.parametrize(("config", "epoch"), RULES)
def test_the_rule_chooses_by_metric_then_its_tie_breaks(config, epoch):
    rule = SelectionRule.from_config(config)
    assert rule.select(history(ACC, NLL)).epoch == epoch


def test_the_reason_names_the_ties_and_what_broke_them():
    rule = SelectionRule.from_config(None)
    records = history(ACC, NLL)
    for n, epoch, reason in [
        (5, 4, "highest val/acc 0.9000; tied with epochs 2, 3; lowest val/nll 0.2000 among "
               "them; tied with epoch 3; the later epoch"),
        (3, 3, "highest val/acc 0.9000; tied with epoch 2; lowest val/nll 0.2000 among them"),
        (2, 2, "highest val/acc 0.9000, no tie"),
    ]:
        chosen = rule.select(records[:n])
        assert chosen.epoch == epoch
        assert rule.explain(records[:n], chosen) == reason
    assert rule.describe() == "best val/acc, ties broken by lower val/nll, then the later epoch"
    nll = SelectionRule.from_config({"metric": "val/nll", "tie_break": []})
    assert nll.explain(records, nll.select(records)) == "lowest val/nll 0.1000, no tie"


def test_each_metric_is_maximised_or_minimised_by_its_name():
    modes = {m: SelectionRule.from_config({"metric": m}).mode for m in VAL_METRICS}
    assert modes == {"val/acc": "max", "val/acc_top5": "max", "val/ece": "min",
                     "val/nll": "min", "val/brier": "min"}
    # an explicit mode equal to the inferred one is the same rule (the same teacher cache key),
    # and so is a tie-break on what is compared already
    assert SelectionRule.from_config({"mode": "max"}) == SelectionRule.from_config(None)
    assert SelectionRule.from_config({"tie_break": ["val/acc", "val/nll", "val/nll", "last"]}
                                     ) == SelectionRule.from_config(None)
    assert SelectionRule.from_config({"metric": "val/nll"}).tie_break == ("last",)


def test_a_missing_or_nan_value_never_wins():
    rule = SelectionRule.from_config(None)
    records = [Record(1, {"val/acc": 0.2, "val/nll": 2.0}),
               Record(2, {"val/acc": math.nan, "val/nll": 0.1}), Record(3, {"val/nll": 0.1})]
    assert rule.select(records).epoch == 1


@pytest.mark.parametrize(("config", "words"), [
    ({"metric": "test/acc"}, ["selection.metric", "val/acc, val/acc_top5", "'test/acc'"]),
    ({"metric": "val/accuracy"}, ["selection.metric", "val/nll"]),
    ({"tie_break": ["val/nll", "latest"]}, ["'latest'", "last/first"]),
    ({"tie_break": ["last", "val/nll"]}, ["'last'", "must come last"]),
    ({"mode": "up"}, ["selection.mode", "max, min"]),
])
def test_bad_rules_are_refused_in_one_line(config, words):
    with pytest.raises(ConfigError) as e:
        SelectionRule.from_config(config)
    assert "\n" not in str(e.value)
    for word in words:
        assert word in str(e.value)


def test_the_history_travels_in_the_checkpoint(tmp_path):
    """What last.ckpt keeps of the callback (no tensors: read with weights_only=True), and
    what comes back: in a resumed fit, not in a test (whose best.ckpt saw a shorter history)."""
    rule = SelectionRule.from_config(None)
    before = SelectionCheckpoint(tmp_path, rule)
    before.records = history(ACC[:3], NLL[:3])
    torch.save({"callbacks": {before.state_key: before.state_dict()}}, tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)
    after = SelectionCheckpoint(tmp_path, rule)
    fitting, testing = (SimpleNamespace(state=SimpleNamespace(fn=fn)) for fn in ("fit", "test"))
    after.on_load_checkpoint(fitting, None, saved)
    assert after.records == before.records and after.chosen.epoch == 3
    after.records = history(ACC, NLL)
    after.on_load_checkpoint(testing, None, saved)
    assert after.chosen.epoch == 4


# -- real runs with a scripted val history ----------------------------------------------------

SCRIPT = ("+callbacks.script={_target_: helpers.callbacks.ScriptedVal, "
          f"acc: {ACC}, nll: {NLL}}}")
STOP = "+callbacks.stop={_target_: helpers.callbacks.StopAt}"  # KDLAB_TEST_STOP_AT_STEP
ARGS = ["method=ce", *FAST, "trainer.max_epochs=5", "+trainer.limit_train_batches=2", "seed=1",
        SCRIPT, STOP]


def student_weights(ckpt) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLAB_CACHE_DIR", str(root / "cache"))
        return root / "run", run(compose(ARGS), root / "run")


def test_a_run_keeps_and_reports_the_epoch_the_rule_selects(reference):
    run_dir, results = reference
    reason = ("highest val/acc 0.9000; tied with epochs 2, 3; lowest val/nll 0.2000 among "
              "them; tied with epoch 3; the later epoch")
    assert results["selection"] == {
        "metric": "val/acc", "mode": "max", "tie_break": ["val/nll", "last"], "epoch": 4,
        "reason": reason,
        "rule": "best val/acc, ties broken by lower val/nll, then the later epoch"}
    assert results["best_epoch"] == 4 and results["epochs"] == 5
    assert results["val"]["acc"] == pytest.approx(0.9) and results["val"]["nll"] == \
        pytest.approx(0.2)
    # best.ckpt holds the weights epoch 4 ended with (not the first of the tied epochs)
    best = student_weights(run_dir / "checkpoints" / "best.ckpt")
    scripted = {e: torch.load(run_dir / "scripted" / f"epoch{e}.pt", weights_only=True)
                for e in (2, 4)}
    assert same_weights(best, scripted[4]) and not same_weights(best, scripted[2])
    assert torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 3


def test_a_resumed_run_selects_what_the_uninterrupted_run_selects(reference, tmp_path,
                                                                  monkeypatch):
    """Stopped in epoch 5, after epoch 4 was kept as best: the resumed run knows epochs 1-4
    from last.ckpt (were they forgotten, epoch 5 alone would be "best")."""
    ref_dir, ref = reference
    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KDLAB_TEST_STOP_AT_STEP", "9")  # 2 steps per epoch: inside epoch 5
    with pytest.raises(Interrupted):
        run(compose(ARGS), tmp_path / "run")
    monkeypatch.delenv("KDLAB_TEST_STOP_AT_STEP")
    resumed = run(compose([*ARGS, "resume=true"]), tmp_path / "run")
    for key in ("selection", "best_epoch", "val", "test", "test_last"):
        assert resumed[key] == ref[key], key
    assert same_weights(student_weights(tmp_path / "run" / "checkpoints" / "best.ckpt"),
                        student_weights(ref_dir / "checkpoints" / "best.ckpt"))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["best_epoch"] == 4
