"""ALM-KD: its step scale and update rules against independent references, constraints, the
training loss, resume, DDP row sync (2 gloo processes) and end-to-end runs on noisy digits.
The lookahead engine it uses is tested in test_lookahead.py.

The references here (and in lookahead_references.py) are computed from scratch with
autograd on per-term losses (torch's own cross-entropy and KL), never with the method's
closed forms.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.context import FakeContext
from helpers.gloo import gloo_ranks
from lookahead_references import D64, T, random_problem, reference_last_layer_step, reference_terms
from torch import nn

from kdlab.errors import ConfigError
from kdlab.methods.alm_kd import (
    ALMKD,
    AUTHORS_BATCH,
    AUTHORS_CHUNK_BATCHES,
    AUTHORS_CLASSES,
    AUTHORS_LR,
    constrained_step,
    initial_weights,
    project_simplex,
    simulated_step,
)
from kdlab.methods.alm_kd_report import PassRecord, decode_history, encode_history, noise_auroc
from kdlab.methods.base import Outputs
from kdlab.methods.lookahead import last_layer_meta_grad, sync_rows

# -- (c) constraints -----------------------------------------------------------------------


def _simplex_by_bisection(v, iters=200):
    """Reference projection: find theta with sum(max(v - theta, 0)) = 1 by bisection."""
    lo, hi = v.min(1).values - 1, v.max(1).values
    for _ in range(iters):
        mid = (lo + hi) / 2
        too_big = (v - mid[:, None]).clamp_min(0).sum(1) > 1
        lo, hi = torch.where(too_big, mid, lo), torch.where(too_big, hi, mid)
    return (v - ((lo + hi) / 2)[:, None]).clamp_min(0)


def test_project_simplex_matches_bisection_and_keeps_simplex_rows():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200, 4, generator=g, dtype=D64) * 3
    v[0] = torch.tensor([5.0, -1.0, 0.0, 0.0], dtype=D64)  # a vertex
    proj = project_simplex(v)
    assert (proj >= 0).all()
    torch.testing.assert_close(proj.sum(1), torch.ones(200, dtype=D64))
    torch.testing.assert_close(proj, _simplex_by_bisection(v), rtol=0, atol=1e-10)
    torch.testing.assert_close(project_simplex(proj), proj)  # idempotent
    torch.testing.assert_close(proj[0], torch.tensor([1.0, 0, 0, 0], dtype=D64))


def test_initial_weights():
    free = initial_weights(5, 3, 0.9, "free")
    assert torch.allclose(free, torch.tensor([0.1, 0.9, 0.9, 0.9]).expand(5, 4))
    convex = initial_weights(5, 3, 0.9, "convex")
    assert torch.allclose(convex, torch.tensor([0.1, 0.3, 0.3, 0.3]).expand(5, 4))


def FakeCtx(dm, student, teachers, root, epoch=0, lr=0.05, rank=0, world=1):  # noqa: N802
    """The method context of a run on ``dm``'s train and meta splits (tests/helpers)."""
    data = {s: (dm.splits[s].inputs, dm.splits[s].targets) for s in ("train", "meta")}
    return FakeContext(student, tuple(teachers), data=data, batch_size=dm.batch_size,
                       seed=dm.seed, noise_mask=dm.noise_mask, run_dir=Path(str(root)),
                       current_epoch=epoch, current_lr=lr, global_rank=rank, world_size=world,
                       is_global_zero=rank == 0)


def _digits(noise_rate=0.4, seed=0):
    from kdlab.data.digits import DigitsDataModule

    dm = DigitsDataModule(noise={"type": "symmetric", "rate": noise_rate}, seed=seed)
    dm.setup()
    return dm


def _cnn(width, seed):
    from kdlab.models import build_model

    torch.manual_seed(seed)
    return build_model("cnn", 10, (1, 8, 8), width=width)


@pytest.mark.parametrize("combination,lookahead", [("free", "last_layer"),
                                                   ("convex", "last_layer"),
                                                   ("free", "full")])
def test_meta_pass_respects_constraints_and_leaves_the_student_alone(tmp_path, combination,
                                                                     lookahead):
    dm = _digits()
    student, teachers = _cnn(8, 0).train(), [_cnn(16, 1), _cnn(16, 2)]
    method = ALMKD(combination=combination, lookahead=lookahead, meta_lr=1e6, meta_start=0,
                   row_update="raw",  # a huge raw step: every row reaches a bound
                   meta_every=1, inner_steps=2, clamp_min=0.05, clamp_max=1.5,
                   meta_batch_size=100, chunk_batches=4 if lookahead == "last_layer" else 10)
    ctx = FakeCtx(dm, student, teachers, tmp_path)
    method.setup(ctx)
    method.setup(ctx)  # idempotent
    init = method.mixing_weights.clone()
    assert init.shape == (dm.train_size, 3)
    before = {k: v.clone() for k, v in student.state_dict().items()}

    method.on_train_epoch_start(ctx)

    table = method.mixing_weights
    assert student.training
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert (table != init).any(1).float().mean() > 0.9  # nearly every row moved
    if combination == "free":
        assert table.min() >= 0.05 and table.max() <= 1.5
        assert (table == 0.05).any() and (table == 1.5).any()  # the huge step hits both bounds
    else:
        assert (table >= 0).all()
        torch.testing.assert_close(table.sum(1), torch.ones(len(table)))
    assert {"alm/label_mean", "alm/label_clean_mean", "alm/label_noisy_std",
            "alm/teacher1_noisy_mean", "alm/noise_auroc"} <= set(ctx.logged)
    assert (tmp_path / "alm_mixing_weights.png").stat().st_size > 0
    mixing = method.results()["mixing"]
    assert mixing["meta_passes"] == 1
    noisy = dm.noise_mask
    assert mixing["label_weight_noisy"] == pytest.approx(float(table[noisy, 0].double().mean()))
    assert mixing["label_weight_clean"] == pytest.approx(float(table[~noisy, 0].double().mean()))


def test_the_weight_plot_counts_epochs_from_1(tmp_path, monkeypatch):
    """The pass Lightning runs at the start of its epoch 4 is labelled e5: the log's
    "epoch 5" (counted from 1) is the epoch it ran before."""
    import matplotlib.figure

    from kdlab.methods.alm_kd_plots import plot_mixing_history

    summary = torch.rand(2, 3, 7, dtype=D64)
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *args, **kwargs: figures.append(fig))
    plot_mixing_history([PassRecord(-1, summary), PassRecord(4, summary, 0.75)],
                        torch.rand(10, 2), None, ["label", "teacher"], tmp_path / "plot.png")
    labels = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert labels == ["init", "e5\nAUC 0.75"]


def test_setup_keeps_a_sized_table_and_rejects_no_teacher(tmp_path):
    dm = _digits()
    method = ALMKD()
    ctx = FakeCtx(dm, _cnn(8, 0), [_cnn(8, 1)], tmp_path)
    method.setup(ctx)
    method.mixing_weights[:3] = 7.0
    method.setup(ctx)
    assert (method.mixing_weights[:3] == 7.0).all()
    with pytest.raises(ConfigError, match="needs a teacher"):
        ALMKD().setup(FakeCtx(dm, _cnn(8, 0), [], tmp_path))


def test_history_survives_checkpoints_and_earlier_restores():
    method = ALMKD()
    method.mixing_weights = initial_weights(6, 1, 0.9, "free")
    summary = torch.zeros(2, 3, 7, dtype=D64)
    summary[:, 2] = float("nan")  # no noisy examples: NaN summaries must survive
    method.history = [PassRecord(-1, summary), PassRecord(4, summary + 1, 0.75)]
    early = copy.deepcopy(method.state_dict())  # e.g. the best-on-val checkpoint
    method.history.append(PassRecord(8, summary + 2, 0.5, torch.tensor([1.5, 0.25], dtype=D64)))
    late = method.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in late.values())  # loadable as a teacher
    fresh = ALMKD()
    fresh.mixing_weights = initial_weights(6, 1, 0.9, "free")
    fresh.load_state_dict(late)  # resume in a new process: the whole record comes back
    assert [r.epoch for r in fresh.history] == [-1, 4, 8]
    torch.testing.assert_close(fresh.history[2].summary, summary + 2, equal_nan=True)
    assert fresh.history[1].noise_auroc == 0.75 and fresh.history[1].rebalance is None
    assert fresh.history[2].rebalance.tolist() == [1.5, 0.25]
    method.load_state_dict(early)  # restoring an earlier checkpoint forgets no pass
    assert [r.epoch for r in method.history] == [-1, 4, 8]
    assert method.results()["mixing"]["meta_passes"] == 2
    # the first encoding ([epoch, summary..] rows) still reads
    old = torch.stack([torch.cat([torch.tensor([float(e)], dtype=D64), (summary + e).flatten()])
                       for e in (-1, 4)])
    assert [r.epoch for r in decode_history(old)] == [-1, 4]
    torch.testing.assert_close(decode_history(old)[1].summary, summary + 4, equal_nan=True)
    assert [r.epoch for r in decode_history(encode_history(method.history))] == [-1, 4, 8]


# -- (d) the training loss -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_training_loss_equals_the_formula(k):
    g = torch.Generator().manual_seed(k)
    n_train, b, c = 30, 7, 5
    method = ALMKD(temperature=T)
    method.mixing_weights = torch.rand(n_train, k + 1, generator=g) * 2
    index = torch.tensor([3, 29, 0, 11, 3, 17, 8])
    s = torch.randn(b, c, generator=g) * 2
    teachers = [torch.randn(b, c, generator=g) * 3 for _ in range(k)]
    y = torch.randint(0, c, (b,), generator=g)
    terms = method.loss_terms(Outputs(s), [Outputs(t) for t in teachers],
                              {"input": None, "target": y, "index": index})

    # the formula, written out in float64 with explicit sums
    lam = method.mixing_weights[index].double()
    s64 = s.double()
    log_p = s64 - s64.exp().sum(1, keepdim=True).log()
    expected = {"ce": (lam[:, 0] * -log_p[torch.arange(b), y]).mean()}
    for m, t in enumerate(teachers):
        st, tt = s64 / T, t.double() / T
        log_ps = st - st.exp().sum(1, keepdim=True).log()
        log_pt = tt - tt.exp().sum(1, keepdim=True).log()
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(1) * T * T
        expected["kd" if k == 1 else f"kd{m}"] = (lam[:, m + 1] * kl).mean()
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert float(terms[name]) == pytest.approx(float(value), rel=1e-5), name
    with pytest.raises(ValueError, match="teacher columns"):
        method.loss_terms(Outputs(s), [Outputs(s)] * (k + 1), {"target": y, "index": index})


# -- (e) the step: the authors' rule, the scale-free default, convex mode -------------------


def _toy_from(x, y, xm, ym, batch_size, noise_mask=None):
    dm = ToyData.__new__(ToyData)
    dm.splits = {"train": ToySplit(x, y), "meta": ToySplit(xm, ym)}
    dm.train_size, dm.seed, dm.batch_size, dm.eval_batch_size = len(y), 0, batch_size, 64
    dm.noise_mask = torch.zeros(len(y), dtype=torch.bool) if noise_mask is None else noise_mask
    return dm


def _linear(d, c, seed, scale=1.0):
    torch.manual_seed(seed)
    layer = nn.Linear(d, c).double()
    with torch.no_grad():
        layer.weight.mul_(scale)
    return layer


def _one_pass(dm, student, teacher, lr, **kwargs):
    """The table after one meta pass (float64 throughout: a float64 student and table); the
    raw row update (meta_lr's step, which the step tests measure) unless a test names another."""
    kwargs.setdefault("row_update", "raw")
    method = ALMKD(meta_start=0, meta_every=1, plot=False, **kwargs)
    ctx = FakeCtx(dm, student, [teacher], "unused", lr=lr)
    method.setup(ctx)
    method.mixing_weights = method.mixing_weights.double()
    method.column_scales = method.column_scales.double()
    method.on_train_epoch_start(ctx)
    return method


def _toyrandom_problem(n=48, n_meta=20, d=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=D64), torch.randint(0, c, (n,), generator=g),
            torch.randn(n_meta, d, generator=g, dtype=D64),
            torch.randint(0, c, (n_meta,), generator=g))


def transcribe_authors_chunk(lam, x, y, teacher_logits, layer, x_meta, y_meta, lr, b, meta_lr,
                             inner_steps, lo, hi, step=None):
    """The authors' update of one chunk, written out: per-example gradients of the
    train-batch-mean loss (1/b) sum_j l_ij l_ij, summed over the chunk, one SGD step of the
    last layer with the student's lr, validation CE, lambda -= meta_lr * grad (or
    ``step(grad)``), clamp."""
    w0, b0 = layer.weight.detach(), layer.bias.detach()
    for _ in range(inner_steps):
        lam_v = lam.clone().requires_grad_(True)
        w = w0.clone().requires_grad_(True)
        bias = b0.clone().requires_grad_(True)
        grad_w, grad_b = torch.zeros_like(w0), torch.zeros_like(b0)
        for i in range(len(y)):  # one example at a time
            logits = x[i:i + 1] @ w.T + bias
            terms = reference_terms(logits, y[i:i + 1], teacher_logits[:, i:i + 1], T)[0]
            loss_i = (lam_v[i] * terms).sum() / b
            gw, gb = torch.autograd.grad(loss_i, [w, bias], create_graph=True)
            grad_w, grad_b = grad_w + gw, grad_b + gb
        meta_logits = x_meta @ (w0 - lr * grad_w).T + (b0 - lr * grad_b)
        (g,) = torch.autograd.grad(F.cross_entropy(meta_logits, y_meta), lam_v)
        lam = (lam - (meta_lr * g if step is None else step(g))).clamp(lo, hi).detach()
    return lam


def test_authors_step_is_the_authors_update_rule():
    x, y, xm, ym = _toyrandom_problem()
    student, teacher = _linear(5, 4, 0), _linear(5, 4, 1, scale=3.0)
    lr, b = 0.004, 16
    dm = _toy_from(x, y, xm, ym, batch_size=b)  # 3 batches of 16 = the whole split: one chunk
    method = _one_pass(dm, student, teacher, lr, paper=True, meta_lr=1500.0, inner_steps=5,
                       chunk_batches=3)
    with torch.no_grad():
        t_logits = teacher(x)[None]
    expected = transcribe_authors_chunk(initial_weights(48, 1, 0.9, "free").double(), x, y,
                                        t_logits, student, xm, ym, lr, b, 1500.0, 5, 1e-7, 2.0)
    table = method.mixing_weights
    moved = (table - 0.1).abs() > 1e-3
    interior = (table > 1e-6) & (table < 2.0 - 1e-9)
    assert moved[:, 0].float().mean() > 0.5 and interior.float().mean() > 0.5  # non-trivial
    torch.testing.assert_close(table, expected, rtol=1e-9, atol=1e-11)


# paper=true's step and kernel without its raw row update
AUTHORS_STEP = {"step_scale": "authors", "kernel": "raw", "rebalance": 0.0}


@pytest.mark.parametrize("row_update", ["rms", "zscore"])
def test_a_normalised_row_update_moves_a_typical_row_by_row_step(row_update):
    x, y, xm, ym = _toyrandom_problem()
    student, teacher = _linear(5, 4, 0), _linear(5, 4, 1, scale=3.0)
    lr, b, row_step = 0.004, 16, 0.03
    dm = _toy_from(x, y, xm, ym, batch_size=b)  # one chunk: the whole split
    method = _one_pass(dm, student, teacher, lr, inner_steps=3, chunk_batches=3,
                       row_update=row_update, row_step=row_step, **AUTHORS_STEP)

    def normalised(g):  # per column, over the chunk's 48 rows, written out
        rows = g - g.mean(0) if row_update == "zscore" else g
        return row_step * rows / (rows ** 2).mean(0).sqrt()

    with torch.no_grad():
        t_logits = teacher(x)[None]
    expected = transcribe_authors_chunk(initial_weights(48, 1, 0.9, "free").double(), x, y,
                                        t_logits, student, xm, ym, lr, b, None, 3, 1e-7, 2.0,
                                        step=normalised)
    torch.testing.assert_close(method.mixing_weights, expected, rtol=1e-9, atol=1e-11)
    moved = (method.mixing_weights - initial_weights(48, 1, 0.9, "free").double()).abs()
    assert 0.5 * 3 * row_step < float(moved.mean()) <= 3 * row_step  # ~ row_step per step


def test_a_normalised_row_step_follows_the_learning_rate_schedule():
    """A later pass at half the highest lr seen moves the rows half as far (same evidence:
    the same student, teacher and chunk, passes at epochs 0 and 1 from one start)."""
    x, y, xm, ym = _toyrandom_problem()
    student, teacher = _linear(5, 4, 0), _linear(5, 4, 1, scale=3.0)
    dm = _toy_from(x, y, xm, ym, batch_size=16)
    moves = {}
    for lrs in ((0.004,), (0.008, 0.004)):
        method = ALMKD(meta_start=0, meta_every=1, plot=False, inner_steps=1, chunk_batches=3,
                       row_update="zscore", row_step=0.03, **AUTHORS_STEP)
        method.setup(FakeCtx(dm, student, [teacher], "unused"))
        method.mixing_weights = method.mixing_weights.double()
        for epoch, lr in enumerate(lrs):  # a first pass at a higher lr sets the peak
            before = method.mixing_weights.clone()
            method.on_train_epoch_start(FakeCtx(dm, student, [teacher], "unused", epoch=epoch,
                                                lr=lr))
        moves[lrs] = (method.mixing_weights - before)
        assert float(method.peak_lr) == max(lrs)
    # the evidence of the last pass differs only by the table it starts from; compare the
    # typical move (RMS over the rows of the label column, which no clamp touched)
    rms = {k: float(v[:, 1].pow(2).mean().sqrt()) for k, v in moves.items()}
    assert rms[(0.008, 0.004)] == pytest.approx(0.5 * rms[(0.004,)], rel=1e-6)


def test_auto_step_is_the_authors_step_in_the_authors_setting():
    n = AUTHORS_CHUNK_BATCHES * AUTHORS_BATCH
    assert simulated_step("auto", AUTHORS_LR, AUTHORS_BATCH, AUTHORS_CLASSES) == \
        pytest.approx(simulated_step("authors", AUTHORS_LR, AUTHORS_BATCH, AUTHORS_CLASSES),
                      rel=1e-15)
    x, y, xm, ym = _toyrandom_problem(n=n, n_meta=60, d=6, c=AUTHORS_CLASSES, seed=3)
    dm = _toy_from(x, y, xm, ym, batch_size=AUTHORS_BATCH)
    student, teacher = _linear(6, AUTHORS_CLASSES, 0), _linear(6, AUTHORS_CLASSES, 1, 3.0)
    tables = [_one_pass(dm, student, teacher, AUTHORS_LR, **kwargs).mixing_weights
              for kwargs in ({"kernel": "raw", "rebalance": 0.0}, {"paper": True})]
    assert (tables[0] != 0.1).any()
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", ["raw", "centered"])
def test_auto_step_does_not_depend_on_lr_batch_chunk_or_meta_batch_size(kernel):
    """Per unit of evidence: exactly in the meta batch size, to first order in the step (the
    lookahead is the step training takes) in the lr, the batch size and the chunk size."""
    x, y, xm, ym = _toyrandom_problem(seed=4)
    student, teacher = _linear(5, 4, 0), _linear(5, 4, 1, scale=3.0)
    init = initial_weights(48, 1, 0.9, "free").double()

    def moves(lr=1e-6, b=16, chunk_batches=3, copies=1, meta_copies=1, mode="auto",
              meta_lr=300.0):
        dm = _toy_from(x.repeat(copies, 1), y.repeat(copies), xm.repeat(meta_copies, 1),
                       ym.repeat(meta_copies), batch_size=b)
        table = _one_pass(dm, student, teacher, lr, step_scale=mode, meta_lr=meta_lr,
                          inner_steps=3, chunk_batches=chunk_batches, kernel=kernel,
                          kernel_scale=5.0).mixing_weights
        return table - init.repeat(copies, 1)

    base = moves()  # one chunk of 48 examples
    assert 1e-3 < base.abs().max() < 0.09  # moved, and no clamp reached
    torch.testing.assert_close(moves(meta_copies=4), base, rtol=1e-10, atol=1e-13)  # exact
    first_order = dict(rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(moves(lr=1e-5), base, **first_order)  # 10x the lr
    torch.testing.assert_close(moves(b=8, chunk_batches=6), base, **first_order)  # half b
    torch.testing.assert_close(moves(b=4, chunk_batches=12), base, **first_order)
    tripled = moves(b=48, copies=3)  # a chunk of 3 copies: every copy moves as one did
    for k in range(3):
        torch.testing.assert_close(tripled[48 * k:48 * (k + 1)], base, **first_order)
    # beyond first order the lookahead is the real step: a 300x larger lr looks further
    assert not torch.allclose(moves(lr=3e-2), base, rtol=2e-3, atol=1e-6)
    # the authors' step is proportional to lr / b: equal at the matching meta_lr, 10x at 10x
    matching = 300.0 * (AUTHORS_LR / AUTHORS_BATCH) / (1e-6 / 16) * 4 / AUTHORS_CLASSES
    torch.testing.assert_close(moves(mode="authors", meta_lr=matching), base, **first_order)
    torch.testing.assert_close(moves(mode="authors", meta_lr=matching / 10, lr=1e-5), base,
                               **first_order)


def _prototyperandom_problem(c, per_class=3, meta_per_class=5, a=2.0):
    """Orthogonal class prototypes h = a e_y, a student with p_true = 0.8 everywhere, a
    teacher that agrees; per class two clean examples and one labelled as the next class."""
    alpha = math.log(4 * (c - 1))  # softmax(alpha e_y)_y = 0.8
    eye = torch.eye(c, dtype=D64)
    y = torch.arange(c).repeat_interleave(per_class)
    noisy = (torch.arange(len(y)) % per_class) == per_class - 1
    label = torch.where(noisy, (y + 1) % c, y)
    ym = torch.arange(c).repeat_interleave(meta_per_class)
    return SimpleNamespace(h=a * eye[y], label=label, noisy=noisy, h_meta=a * eye[ym], y_meta=ym,
                           weight=alpha / a * eye, bias=torch.zeros(c, dtype=D64),
                           teacher=(alpha * eye[y])[None])


@pytest.mark.parametrize("mode,lo,hi", [("auto", 0.8, 1.25), ("authors", 0.0, 0.2)])
def test_auto_step_corrects_the_one_over_c_dilution(mode, lo, hi):
    moves = {}
    for c in (10, 100):
        p = _prototyperandom_problem(c)
        lam = initial_weights(len(p.label), 1, 0.9, "free").double()
        step, factor = simulated_step(mode, 0.1, 128, c)
        _, grad = last_layer_meta_grad(lam, p.h, p.label, p.teacher, p.weight, p.bias,
                                       p.h_meta, p.y_meta, step, T)
        move = -1500 * factor * grad[:, 0]
        assert (move[p.noisy] < 0).all() and (move[~p.noisy] > 0).all()  # the right way
        moves[c] = move[p.noisy].mean()
    assert lo < float(moves[100] / moves[10]) < hi


def test_convex_step_is_the_early_codes_one_minus_l_l_update():
    p = random_problem(k=1, seed=11)
    step, eta = 0.05, 40.0
    l0 = torch.rand(len(p.y), generator=torch.Generator().manual_seed(0), dtype=D64)
    rows = torch.stack([1 - l0, l0], dim=1)
    _, grad = last_layer_meta_grad(rows, p.h, p.y, p.teacher, p.weight, p.bias, p.h_meta,
                                   p.y_meta, step, T)
    new = constrained_step(rows, grad, eta, "convex", 0.0, 1.0)

    # the early code: weights (1 - l, l), l a free variable, l <- clip(l - eta dL/dl, 0, 1)
    l_var = l0.clone().requires_grad_(True)
    _, grad_rows = reference_last_layer_step(torch.stack([1 - l_var, l_var], 1).detach(), p.h,
                                             p.y, p.teacher, p.weight, p.bias, p.h_meta,
                                             p.y_meta, step)
    dl = grad_rows[:, 1] - grad_rows[:, 0]  # chain rule through (1 - l, l)
    expected = (l0 - eta * dl).clamp(0, 1)
    assert ((expected > 0) & (expected < 1)).any() and ((expected == 0) | (expected == 1)).any()
    torch.testing.assert_close(new[:, 1], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new[:, 0], 1 - expected, rtol=1e-12, atol=1e-12)
    # ... twice the move of the projection of the free step, l <- l - eta/2 dL/dl
    free_projected = project_simplex(rows - eta * grad)
    inside = (expected > 0) & (expected < 1) & (free_projected[:, 1] > 0)
    torch.testing.assert_close((new[inside, 1] - l0[inside]),
                               2 * (free_projected[inside, 1] - l0[inside]))


def test_convex_step_with_several_teachers_moves_along_the_simplex():
    g = torch.Generator().manual_seed(2)
    rows = project_simplex(torch.rand(50, 4, generator=g, dtype=D64))
    rows = 0.9 * rows + 0.025  # strictly inside
    grad = torch.randn(50, 4, generator=g, dtype=D64) * 1e-3
    new = constrained_step(rows, grad, 1.0, "convex", 0.0, 1.0)
    torch.testing.assert_close(new.sum(1), torch.ones(50, dtype=D64))
    torch.testing.assert_close(new - rows, -2 * (grad - grad.mean(1, keepdim=True)))


# -- (e2) the centred kernel and the global rebalancing ------------------------------------


def test_rebalance_moves_the_column_scales_by_the_exact_gradient():
    x, y, xm, ym = _toyrandom_problem(seed=9)
    student, teacher = _linear(5, 4, 0), _linear(5, 4, 1, scale=3.0)
    meta_lr = 1e5
    method = _one_pass(_toy_from(x, y, xm, ym, batch_size=16), student, teacher, 0.05,
                       kernel="centered", rebalance=1.0, meta_lr=meta_lr, inner_steps=2)
    # one chunk: sum_i l_ij dL/d(c_j l_ij) = dL/dc_j, by autograd through the raw step
    lam = initial_weights(48, 1, 0.9, "free").double()
    c = torch.ones(2, dtype=D64, requires_grad=True)
    step, factor = simulated_step("auto", 0.05, 16, 4)
    w, b = student.weight.detach().clone().requires_grad_(True), student.bias.detach().clone()
    b = b.requires_grad_(True)
    with torch.no_grad():
        t_logits = teacher(x)[None]
    loss = (lam * c * reference_terms(x @ w.T + b, y, t_logits, T)).sum()
    gw, gb = torch.autograd.grad(loss, [w, b], create_graph=True)
    meta = F.cross_entropy(xm @ (w - step * gw).T + (b - step * gb), ym)
    (dc,) = torch.autograd.grad(meta, c)
    expected = (1 - 2 * meta_lr * factor * dc / 48).clamp(1e-7, 2.0)
    assert (expected - 1).abs().min() > 1e-3
    torch.testing.assert_close(method.column_scales, expected.detach(), rtol=1e-10, atol=1e-12)
    # the loss uses c_j l_ij
    index = torch.tensor([0, 5])
    torch.testing.assert_close(method.loss_weights(index),
                               (method.mixing_weights[index] * method.column_scales).float())
    assert method.results()["mixing"]["column_scales"] == pytest.approx(
        method.column_scales.tolist())


def test_options_are_checked():
    with pytest.raises(ValueError, match="step_scale"):
        ALMKD(step_scale="chunk")
    with pytest.raises(ValueError, match="kernel"):
        ALMKD(kernel="cosine")
    paper = ALMKD(paper=True, kernel="centered", rebalance=7.0)
    assert (paper.step_scale, paper.kernel, paper.rebalance) == ("authors", "raw", 0.0)
    default = ALMKD()
    assert (default.step_scale, default.kernel, default.rebalance) == ("auto", "centered", 100)


# -- (e3) chunks, noise AUROC, the noise mask is for reporting only ---------------------------


def test_noise_auroc_against_a_hand_count():
    # noisy 0.1, 0.5, 0.3 vs clean 0.5, 0.9: noisy below clean in 5 pairs, 1 tie -> 5.5 / 6
    w = torch.tensor([0.5, 0.1, 0.9, 0.5, 0.3])
    mask = torch.tensor([False, True, False, True, True])
    assert noise_auroc(w, mask) == pytest.approx(5.5 / 6)
    assert noise_auroc(w, ~mask) == pytest.approx(0.5 / 6)  # swapped roles
    assert noise_auroc(torch.ones(4), torch.tensor([True, False, True, False])) == 0.5
    assert math.isnan(noise_auroc(w, torch.zeros(5, dtype=torch.bool)))
    assert math.isnan(noise_auroc(w, None))
    # many ties: the pairwise definition
    g = torch.Generator().manual_seed(0)
    w = (torch.rand(300, generator=g) * 5).round() / 5
    mask = torch.rand(300, generator=g) < 0.3
    pos, neg = w[mask], w[~mask]
    pairs = (pos[:, None] < neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert noise_auroc(w, mask) == pytest.approx(float(pairs.mean()), rel=1e-12)


def _train(mask, variant, epochs=3):
    """A short training run: a meta pass at every epoch start, then SGD over the train split
    with the method's loss. Returns the method and the student."""
    dm = ToyData(n=120, n_meta=30, batch_size=16)
    dm.noise_mask = mask
    student = _toy_mlp(0)
    method = ALMKD(meta_start=0, meta_every=1, plot=False, inner_steps=2, **variant)
    teachers = [_toy_mlp(1)]
    ctx = FakeCtx(dm, student, teachers, "unused")
    method.setup(ctx)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    train = dm.splits["train"]
    for epoch in range(epochs):
        ctx.current_epoch = epoch
        method.on_train_epoch_start(ctx)
        for pos in torch.randperm(len(train), generator=torch.Generator().manual_seed(epoch)
                                  ).split(16):
            batch = train[pos]
            terms = method.loss_terms(Outputs(student(batch["input"])),
                                      ctx.teacher_outputs(batch["input"]), batch)
            opt.zero_grad()
            sum(terms.values()).backward()
            opt.step()
    return method, student, ctx


@pytest.mark.parametrize("variant", [{"paper": True}, {}])
def test_the_noise_mask_is_read_for_reporting_only(variant):
    real = ToyData(n=120, n_meta=30, batch_size=16).noise_mask
    garbage = torch.rand(120, generator=torch.Generator().manual_seed(99)) < 0.7
    a, student_a, ctx_a = _train(real, variant)
    b, student_b, ctx_b = _train(garbage, variant)
    assert torch.equal(a.mixing_weights, b.mixing_weights)
    assert torch.equal(a.column_scales, b.column_scales)
    for (name, pa), pb in zip(student_a.state_dict().items(), student_b.state_dict().values(),
                              strict=True):
        assert torch.equal(pa, pb), name
    auroc_a = a.results()["mixing"]["noise_auroc"]
    assert auroc_a == pytest.approx(noise_auroc(a.mixing_weights[:, 0], real))
    assert auroc_a != b.results()["mixing"]["noise_auroc"]  # the reports do differ
    assert ctx_a.logged["alm/noise_auroc"] == pytest.approx(auroc_a)
    history = a.results()["mixing"]["noise_auroc_history"]
    # keyed by the epoch each pass ran before, counted from 1
    assert list(history) == ["1", "2", "3"] and history["3"] == pytest.approx(auroc_a)


# -- (f) DDP: sync_rows over 2 gloo processes ----------------------------------------------


class ToySplit:
    def __init__(self, x, y):
        self.inputs, self.targets = x, y

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, pos):
        pos = torch.as_tensor(pos)
        return {"input": self.inputs[pos], "target": self.targets[pos], "index": pos}


class ToyData:
    """The datamodule surface a meta pass reads (splits by position, model_batch); no
    Lightning, so the spawned processes start fast."""

    def __init__(self, n=300, n_meta=50, d=6, c=4, seed=0, batch_size=16, dtype=torch.float32):
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)
        xm = torch.randn(n_meta, d, generator=g, dtype=dtype)
        ym = torch.randint(0, c, (n_meta,), generator=g)
        self.splits = {"train": ToySplit(x, y), "meta": ToySplit(xm, ym)}
        self.train_size, self.seed, self.batch_size, self.eval_batch_size = n, seed, batch_size, 64
        self.noise_mask = torch.rand(n, generator=g) < 0.3

    def model_batch(self, batch, device, train=False):
        return {k: v.to(device) for k, v in batch.items()}


def _toy_mlp(seed, d=6, c=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, c))


DDP_VARIANTS = {"paper": {"paper": True}, "default": {"meta_lr": 5e4}}


def _single_process_tables(out_dir, world=2):
    """One process walking every chunk, with the step of ``world`` ranks' global batch."""
    tables = {}
    for name, kwargs in DDP_VARIANTS.items():
        method = ALMKD(meta_start=0, meta_every=1, plot=False, inner_steps=2, chunk_batches=2,
                       **kwargs)
        ctx = FakeCtx(ToyData(), _toy_mlp(0), [_toy_mlp(1), _toy_mlp(2)], out_dir)
        method.setup(ctx)
        run = method._meta_pass_inputs(ctx)
        method.meta_pass(dataclasses.replace(run, batch_size=run.batch_size * world))
        tables[name], tables[name + "_scales"] = method.mixing_weights, method.column_scales
    return tables


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        # 1. sync_rows alone: disjoint shards, plus row 9 updated by both ranks.
        table = torch.arange(20.0).reshape(10, 2)
        updated = torch.zeros(10, dtype=torch.bool)
        mine = torch.arange(rank, 10, world)
        table[mine] = -(rank + 1.0) * (mine[:, None].float() + 1)
        updated[mine] = True
        if rank == 0:
            table[9] = 100.0
            updated[9] = True
        sync_rows(table, updated)
        # 2. a real meta pass: each rank walks its own shard of the train split, then the
        # tables are merged.
        tables = {}
        for name, kwargs in DDP_VARIANTS.items():
            method = ALMKD(meta_start=0, meta_every=1, plot=False, inner_steps=2,
                           chunk_batches=2, **kwargs)
            ctx = FakeCtx(ToyData(), _toy_mlp(0), [_toy_mlp(1), _toy_mlp(2)], out_dir,
                          rank=rank, world=world)
            method.setup(ctx)
            method.on_train_epoch_start(ctx)
            tables[name] = method.mixing_weights
            tables[name + "_scales"] = method.column_scales
        torch.save({"sync": table, **tables}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_rows_gives_both_gloo_ranks_the_same_table(tmp_path):
    gloo_ranks(_ddp_worker, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    expected = torch.arange(20.0).reshape(10, 2)
    for rank in (0, 1):
        rows = torch.arange(rank, 10, 2)
        expected[rows] = -(rank + 1.0) * (rows[:, None].float() + 1)
    expected[9] = (torch.tensor(100.0) + -2.0 * 10) / 2  # both ranks: averaged
    assert torch.equal(r0["sync"], expected) and torch.equal(r1["sync"], expected)
    init = initial_weights(len(r0["paper"]), 2, 0.9, "free")
    single = _single_process_tables(tmp_path)
    for name in DDP_VARIANTS:
        assert torch.equal(r0[name], r1[name]), name
        assert (r0[name] != init).any(1).all(), name  # every row updated by one of the ranks
        # the chunks do not depend on the number of ranks: the same table as one process
        torch.testing.assert_close(r0[name], single[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(r0[name + "_scales"], r1[name + "_scales"], rtol=0, atol=0)
        torch.testing.assert_close(r0[name + "_scales"], single[name + "_scales"], rtol=1e-5,
                                   atol=1e-7)
    assert (single["default_scales"] != 1).all()  # the rebalancing moved


# -- (e, g) end to end on noisy digits -----------------------------------------------------

COMMON = ["dataset=digits", "trainer=cpu", "trainer.max_epochs=2",
          "trainer.enable_progress_bar=false", "noise=symmetric", "noise.rate=0.4",
          "method=alm_kd", "method.meta_start=1", "method.meta_every=1"]


@pytest.fixture(scope="module")
def single_teacher_run(cache_dir, tmp_path_factory):
    from kdlab.config import compose
    from kdlab.pipeline import run

    cfg = compose([*COMMON, "student=cnn_small", "teacher=cnn"])
    out = tmp_path_factory.mktemp("alm_single") / "run"
    return cfg, out, run(cfg, out)


def _check_run_dir(out: Path, results: dict, columns: list[str]) -> None:
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["mixing"] == results["mixing"]
    mixing = on_disk["mixing"]
    assert mixing["meta_passes"] == 1
    for key in ("label_weight_clean", "label_weight_noisy", "teacher_weight_clean",
                "teacher_weight_noisy", "noise_auroc"):
        assert math.isfinite(mixing[key]), key
    assert on_disk["noise"]["type"] == "symmetric"
    assert on_disk["noise"]["realised_rate"] == pytest.approx(0.4 * 0.9, abs=0.05)
    assert (out / "alm_mixing_weights.png").stat().st_size > 0
    with open(out / "logs" / "metrics.csv") as f:
        header = next(csv.reader(f))
    for col in columns:
        assert f"alm/{col}_clean_mean" in header and f"alm/{col}_noisy_mean" in header
    assert "alm/noise_auroc" in header


def test_single_teacher_noisy_digits_end_to_end(single_teacher_run):
    _, out, results = single_teacher_run
    assert results["method"] == "alm_kd" and results["epochs"] == 2
    _check_run_dir(out, results, ["label", "teacher"])


def test_resume_restores_the_weight_table(single_teacher_run, tmp_path):
    import pytorch_lightning as pl
    from helpers.runs import module_for

    from kdlab.data import instantiate_datamodule
    from kdlab.trainer import build_trainer

    cfg, out, results = single_teacher_run
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    table = last["state_dict"]["method.mixing_weights"]
    dm = instantiate_datamodule(cfg)
    dm.setup()
    assert table.shape == (dm.train_size, 2)
    assert (table != initial_weights(len(table), 1, 0.9, "free")).any()  # a pass happened
    # results describe the final table (the pass at epoch 1), not the best-on-val restore
    noisy = dm.noise_mask
    for key, rows, col in (("label_weight_noisy", noisy, 0), ("label_weight_clean", ~noisy, 0),
                           ("teacher_weight_noisy", noisy, 1),
                           ("teacher_weight_clean", ~noisy, 1)):
        assert results["mixing"][key] == pytest.approx(float(table[rows, col].double().mean()))
    assert results["mixing"]["meta_passes"] == 1

    # a fresh module (setup sizes the table) restored from the checkpoint
    module, dm = module_for(cfg)
    module.method.setup(FakeCtx(dm, module.student, list(module.teachers), tmp_path))
    module.load_state_dict(last["state_dict"])
    assert torch.equal(module.method.mixing_weights, table)
    assert module.method.results()["mixing"] == results["mixing"]  # history restored too

    # Lightning's own resume path: setup runs before the restore, nothing left to train
    module, dm = module_for(cfg)
    trainer = build_trainer(cfg, tmp_path / "resumed", [])
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, datamodule=dm, ckpt_path=str(out / "checkpoints" / "last.ckpt"),
                weights_only=True)
    assert torch.equal(module.method.mixing_weights, table)


def test_multi_teacher_experiment_end_to_end(cache_dir, tmp_path):
    from kdlab.config import compose
    from kdlab.data import instantiate_datamodule
    from kdlab.pipeline import run

    # the three teachers inherit teacher.max_epochs: one epoch each is enough for the table
    cfg = compose([*COMMON, "experiment=digits_alm_multi_teacher", "teacher.max_epochs=1"])
    assert [t.model for t in cfg.teachers] == ["cnn", "mlp", "cnn"]
    results = run(cfg, tmp_path / "run")
    assert len(results["teachers"]) == 3
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)
    table = last["state_dict"]["method.mixing_weights"].double()
    dm = instantiate_datamodule(cfg)
    dm.setup()
    noisy = dm.noise_mask
    assert results["mixing"]["teacher_weights_clean"] == pytest.approx(
        table[~noisy, 1:].mean(0).tolist())
    assert results["mixing"]["teacher_weights_noisy"] == pytest.approx(
        table[noisy, 1:].mean(0).tolist())
    _check_run_dir(tmp_path / "run", results, ["label", "teacher0", "teacher1", "teacher2"])


def test_self_distill_experiment_uses_the_students_architecture():
    from kdlab.config import compose

    cfg = compose(["experiment=digits_alm_self_distill"])
    assert cfg.method._target_ == "kdlab.methods.alm_kd.ALMKD"
    assert cfg.choices.teacher == cfg.choices.student == "cnn_small"
    assert cfg.teacher._target_ == cfg.student._target_
    assert cfg.teacher.width == cfg.student.width
    assert cfg.teacher.ckpt == "auto" and not cfg.get("teachers")


@pytest.mark.parametrize("epochs,every", [(200, 10), (240, 12), (100, 5), (30, 2), (8, 1)])
def test_auto_meta_schedule_is_every_five_percent_of_the_run(epochs, every):
    """auto = the authors' 10 / 10 in their 200 epochs, scaled with the run's length."""
    method = ALMKD()
    x = torch.zeros(4, 2)
    ctx = FakeContext(nn.Linear(2, 3), (nn.Linear(2, 3),), data={"train": (x, torch.zeros(4))},
                      max_epochs=epochs)
    method.setup(ctx)
    assert (method.meta_start, method.meta_every) == (every, every)
    passes = [e for e in range(epochs) if method.is_meta_epoch(e)]
    assert passes[:2] == [every, 2 * every] and len(passes) == (epochs - 1) // every
    fixed = ALMKD(meta_start=3, meta_every=4)
    fixed.setup(ctx)
    assert (fixed.meta_start, fixed.meta_every) == (3, 4)


def test_paper_is_the_authors_algorithm_whatever_the_row_update():
    method = ALMKD(paper=True, row_update="zscore")
    assert (method.step_scale, method.kernel, method.rebalance, method.row_update) == \
        ("authors", "raw", 0.0, "raw")
    assert ALMKD().row_update == "zscore"  # kdlab's default (scripts/results/alm_noise_notes.md)
