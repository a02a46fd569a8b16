"""TAID: the loss and its stop-gradient from the formula, the schedule of t against a plain
transcription of the authors' released ``update_t`` (step by step, also in a real fit), the
schedule as module state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from helpers.context import FakeContext
from helpers.runs import FAST, fit
from loss_cases import make_inputs as shared_inputs

from kdlab.config import compose
from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.taid import TAID

CASES = [
    ("random", 10, 3.0, 0.0),
    ("dominant class", 10, 1.0, 40.0),
    ("two classes", 2, 3.0, 0.0),
]


def make_inputs(classes, scale, gap, batch=6, seed=0):
    return shared_inputs(classes, scale, gap, batch=batch, seed=seed, student_gap=False)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_ce_and_kl(s, t, tt):
    ce = kl = 0.0
    for i in range(len(s)):
        p = np_softmax((1 - tt) * s[i] + tt * t[i])
        q = np_softmax(s[i])
        ce += -np.sum(p * np.log(q))
        kl += np.sum([pc * np.log(pc / qc) for pc, qc in zip(p, q, strict=True) if pc > 0])
    return ce / len(s), kl / len(s)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("t_value", [0.4, 0.75, 1.0])
def test_loss_is_ce_to_interpolated_target(case, t_value):
    _, classes, scale, gap = case
    s, t, y = make_inputs(classes, scale, gap)
    ce, kl = ref_ce_and_kl(s.double().numpy(), t.double().numpy(), t_value)
    for objective, expected in (("ce", ce), ("kl", kl)):  # what drives t
        method = TAID(objective=objective)
        method.t.fill_(t_value)
        terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
        assert set(terms) == {"taid"}
        assert terms["taid"].item() == pytest.approx(ce, rel=1e-5, abs=1e-5)
        assert method._objective.item() == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_student_is_a_stopgrad_inside_the_target():
    """d L / d s = (softmax(s) - p_t) / B: no gradient through p_t."""
    s, t, y = make_inputs(10, 3.0, 0.0)
    s.requires_grad_(True)
    method = TAID()
    method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})["taid"].backward()
    sn, tn = s.detach().double().numpy(), t.double().numpy()
    expected = np.stack([np_softmax(sn[i]) - np_softmax(0.6 * sn[i] + 0.4 * tn[i])
                         for i in range(len(sn))]) / len(sn)
    np.testing.assert_allclose(s.grad.double().numpy(), expected, rtol=1e-4, atol=1e-6)


def released_update_t(state, loss, global_step, num_train_steps, t_start=0.4, t_end=1.0,
                      alpha=5e-4, beta=0.99):
    """SakanaAI/TAID ``src/distil_losses/taid.py`` ``TAID.update_t``, transcribed in plain
    floats; ``state`` = (t, momentum, prev_loss), prev_loss = inf before the first call."""
    t, momentum, prev_loss = state
    if math.isinf(prev_loss):
        return t, momentum, loss
    relative_change = (prev_loss - loss) / (prev_loss + 1e-15)
    momentum = beta * momentum + (1 - beta) * relative_change
    adaptive_delta = 1 / (1 + math.exp(-momentum))
    t_target = t_start + (t_end - t_start) * global_step / num_train_steps
    t = min(t_end, max(t_target, t + alpha * adaptive_delta * (1 - t)))
    return t, momentum, loss


def released_schedule(losses, num_train_steps, ahead=False, **kw):
    """(the t each step's loss uses, (t, momentum) after the last): the release computes step n's
    loss with its current t, then calls update_t with that loss and trainer.global_step, which
    inside training_step is n - 1 (``ahead``: n, kdlab's earlier schedule)."""
    state, used = (kw.get("t_start", 0.4), 0.0, math.inf), []
    for n, loss in enumerate(losses, start=1):
        used.append(state[0])
        state = released_update_t(state, loss, n if ahead else n - 1, num_train_steps, **kw)
    return used, state[:2]


def test_release_transcription_by_hand():
    """The first steps worked out with a calculator: t_start 0.4, N = 4, alpha 0.1."""
    used, (_, m) = released_schedule([2.0, 1.0, 1.0, 0.5], 4, alpha=0.1)
    # step 2: delta (2-1)/2 = 0.5, m = 0.005, floor 0.4 + 0.6 * 1/4 = 0.55 beats
    # 0.4 + 0.1 * sigmoid(0.005) * 0.6 = 0.43007...; step 3: delta 0, m = 0.00495, floor 0.7
    # beats 0.55 + 0.1 * sigmoid(0.00495) * 0.45 = 0.57256...
    assert used[:3] == [0.4, 0.4, 0.55]
    assert used[3] == pytest.approx(0.7, abs=1e-15)
    assert m == pytest.approx(0.99 * 0.00495 + 0.01 * 0.5, abs=1e-15)


@pytest.mark.parametrize("floor_progress", ["released", "ahead"])
@pytest.mark.parametrize("alpha", [5e-4, 0.05])
def test_schedule_follows_the_released_update_t(alpha, floor_progress):
    rng = np.random.default_rng(0)
    losses = list(np.exp(-np.linspace(0, 3, 60)) * (1 + 0.2 * rng.standard_normal(60)) + 0.1)
    losses = [float(np.float32(j)) for j in losses]
    total = 50  # more steps than planned: t must stop at t_end
    method = TAID(alpha=alpha, total_steps=total, floor_progress=floor_progress)
    used = []
    for n, j in enumerate(losses, start=1):
        used.append(float(method.t))  # the t step n's loss is computed with
        method._objective = torch.tensor(j, dtype=torch.float32)
        method.on_train_batch_end(FakeContext(torch.nn.Identity(), global_step=n), {})
    expected, (t, m) = released_schedule(losses, total, ahead=floor_progress == "ahead",
                                         alpha=alpha)
    np.testing.assert_allclose(used + [float(method.t)], expected + [t], rtol=1e-6, atol=1e-7)
    assert float(method.momentum) == pytest.approx(m, rel=1e-4, abs=1e-7)
    assert all(b >= a for a, b in zip(used, used[1:], strict=False))  # monotone
    assert float(method.t) == pytest.approx(1.0)
    # the linear floor: step n >= 3 uses at least t_start + 0.6 (n - 2) / N (released) or
    # (n - 1) / N (ahead); steps 1 and 2 use t_start (step 1 only records its loss)
    lag = 2 if floor_progress == "released" else 1
    floors = [0.4 + 0.6 * min((n - lag) / total, 1.0) if n >= 3 else 0.4 for n in range(1, 61)]
    assert all(t >= f - 1e-6 for t, f in zip(used, floors, strict=True))
    assert any(t == pytest.approx(f) for t, f in zip(used[2:], floors[2:], strict=True))


def test_fit_start_reads_total_steps_from_the_context():
    method = TAID()
    method.on_fit_start(FakeContext(torch.nn.Identity(), total_steps=200))
    assert method.floor(101) == pytest.approx(0.7)  # after step 101: 100 steps taken before
    assert method.floor(400) == pytest.approx(1.0)
    ahead = TAID(floor_progress="ahead")
    ahead.on_fit_start(FakeContext(torch.nn.Identity(), total_steps=200))
    assert ahead.floor(100) == pytest.approx(0.7)


class RecordSchedule(pl.Callback):
    """Per training step: the trainer's global_step and the t the loss is computed with (at
    batch start), and the objective the step recorded (batch end, before the module's hook
    updates t)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"global_step": trainer.global_step, "t": float(pl_module.method.t)})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["loss"] = float(pl_module.method._objective)


@pytest.mark.filterwarnings("ignore:.*treespec")
def test_a_real_fit_follows_the_released_schedule_step_by_step(cache_dir, tmp_path):
    """Lightning's global_step inside training_step is the release's n - 1; every step's loss
    in kdlab's fit uses the t the transcribed release would use given the same losses."""
    alpha = 0.2  # large, so the adaptive term wins over the floor on some steps
    cfg = compose(["dataset=digits", *FAST, "trainer.max_epochs=1", "student=mlp",
                   "teacher=cnn", "method=taid", f"method.alpha={alpha}"])
    record = RecordSchedule()
    module = fit(cfg, tmp_path / "run", callbacks=[record])
    steps = record.steps
    assert len(steps) >= 8
    assert [s["global_step"] for s in steps] == list(range(len(steps)))
    total = module.trainer.estimated_stepping_batches
    expected, (_, m) = released_schedule([s["loss"] for s in steps], total, alpha=alpha)
    np.testing.assert_allclose([s["t"] for s in steps], expected, rtol=1e-6, atol=1e-7)
    assert float(module.method.momentum) == pytest.approx(m, rel=1e-4, abs=1e-7)
    floors = [0.4 + 0.6 * max(n - 2, 0) / total for n in range(1, len(steps) + 1)]
    assert any(t > f + 1e-4 for t, f in zip(expected, floors, strict=True))  # adaptive won


def test_schedule_is_module_state():
    method = TAID(total_steps=10)
    for n, j in enumerate([2.0, 1.5, 1.2], start=1):
        method._objective = torch.tensor(j)
        method.on_train_batch_end(FakeContext(torch.nn.Identity(), global_step=n), {})
    state = method.state_dict()
    assert {"t", "momentum", "prev_objective"} <= set(state)
    fresh = TAID(total_steps=10)
    fresh.load_state_dict(state)
    for k in ("t", "momentum", "prev_objective"):
        assert torch.equal(getattr(fresh, k), getattr(method, k))
    assert float(fresh.prev_objective) == pytest.approx(1.2)


def test_single_teacher_only():
    s, t, y = make_inputs(4, 1.0, 0.0)
    with pytest.raises(ConfigError, match="exactly 1 teacher"):
        TAID().loss_terms(Outputs(s), [Outputs(t), Outputs(t)], {"target": y})


def test_unknown_options_are_config_errors():
    with pytest.raises(ConfigError, match="method.floor_progress must be one of"):
        TAID(floor_progress="late")
    with pytest.raises(ConfigError, match="method.objective must be one of"):
        TAID(objective="js")
