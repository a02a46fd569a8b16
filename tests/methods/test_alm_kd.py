"""ALM-KD: meta-gradients against independent references, constraints, the training loss,
resume, DDP row sync (2 gloo processes) and end-to-end runs on noisy digits.

The references here are computed from scratch with autograd on per-term losses (torch's
own cross-entropy and KL), never with the method's closed forms.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import math
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlab.methods.alm_kd import (
    ALMKD,
    full_lookahead_meta_grad,
    initial_weights,
    last_layer_meta_grad,
    project_simplex,
    sync_rows,
    term_logit_grads,
)
from kdlab.methods.base import Outputs

T = 4.0
D64 = torch.float64


# -- independent references ----------------------------------------------------------------


def reference_terms(logits, target, teacher_logits, temperature):
    """(n, K+1) per-example CE and T^2 KL(p_t || p_s), with torch's own loss functions."""
    ce = F.cross_entropy(logits, target, reduction="none")
    log_p_s = F.log_softmax(logits / temperature, dim=-1)
    kls = [F.kl_div(log_p_s, F.log_softmax(t / temperature, dim=-1), log_target=True,
                    reduction="none").sum(-1) * temperature ** 2 for t in teacher_logits]
    return torch.stack([ce, *kls], dim=1)


def reference_last_layer_step(lam, h, y, teacher_logits, weight, bias, h_meta, y_meta, lr):
    """Meta loss and dL/dlambda by autograd through an explicit functional SGD step."""
    lam = lam.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    params = [w]
    b = None
    if bias is not None:
        b = bias.clone().requires_grad_(True)
        params.append(b)
    logits = F.linear(h, w, b)
    loss = (lam * reference_terms(logits, y, teacher_logits, T)).sum(1).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    w1 = w - lr * grads[0]
    b1 = None if b is None else b - lr * grads[1]
    meta_loss = F.cross_entropy(F.linear(h_meta, w1, b1), y_meta)
    (grad,) = torch.autograd.grad(meta_loss, lam)
    return meta_loss.detach(), grad


def reference_full_step_loss(model, lam, x, y, teacher_logits, x_meta, y_meta, lr):
    """Meta loss after a real SGD step on a copy of the model (eval mode, nn API)."""
    model = copy.deepcopy(model).eval()
    loss = (lam * reference_terms(model(x), y, teacher_logits, T)).sum(1).mean()
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad
        return F.cross_entropy(model(x_meta), y_meta)


def _problem(n=10, d=6, c=5, k=2, m=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(
        lam=torch.rand(n, k + 1, generator=g, dtype=D64) * 1.5 + 0.05,
        h=torch.randn(n, d, generator=g, dtype=D64),
        y=torch.randint(0, c, (n,), generator=g),
        teacher=3 * torch.randn(k, n, c, generator=g, dtype=D64),
        weight=torch.randn(c, d, generator=g, dtype=D64),
        bias=torch.randn(c, generator=g, dtype=D64),
        h_meta=torch.randn(m, d, generator=g, dtype=D64),
        y_meta=torch.randint(0, c, (m,), generator=g),
    )


# -- (a) the closed-form last-layer meta-gradient ------------------------------------------


def test_term_logit_grads_match_autograd():
    p = _problem(k=2)
    logits = (p.h @ p.weight.T + p.bias).requires_grad_(True)
    terms = reference_terms(logits, p.y, p.teacher, T)
    closed = term_logit_grads(logits.detach(), p.y, p.teacher, T)
    for j in range(terms.shape[1]):
        (auto,) = torch.autograd.grad(terms[:, j].sum(), logits, retain_graph=True)
        torch.testing.assert_close(closed[j], auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,with_bias", [(1, True), (3, True), (2, False)])
def test_last_layer_meta_grad_matches_functional_step(k, with_bias):
    p = _problem(k=k, seed=k)
    bias = p.bias if with_bias else None
    lr = 0.7
    ref_loss, ref_grad = reference_last_layer_step(p.lam, p.h, p.y, p.teacher, p.weight, bias,
                                                   p.h_meta, p.y_meta, lr)
    loss, grad = last_layer_meta_grad(p.lam, p.h, p.y, p.teacher, p.weight, bias, p.h_meta,
                                      p.y_meta, lr, T)
    assert grad.shape == p.lam.shape and grad.dtype == D64
    assert grad.abs().max() > 1e-4  # a non-trivial problem
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


# -- (b) the full lookahead ----------------------------------------------------------------


def _tiny_model(d=4, c=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, c))
    model = model.double()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.train()


def test_full_lookahead_matches_finite_differences():
    model = _tiny_model()
    g = torch.Generator().manual_seed(1)
    n, m, k = 6, 7, 2
    x, x_meta = torch.randn(n, 4, generator=g, dtype=D64), torch.randn(m, 4, generator=g, dtype=D64)
    y, y_meta = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    teacher = 3 * torch.randn(k, n, 3, generator=g, dtype=D64)
    lam = torch.rand(n, k + 1, generator=g, dtype=D64) + 0.1
    lr = 0.5
    before = {k_: v.clone() for k_, v in model.state_dict().items()}

    loss, grad = full_lookahead_meta_grad(model, lam, x, y, teacher, x_meta, y_meta, lr, T)

    assert model.training  # mode restored
    for name, value in model.state_dict().items():  # BN statistics and weights untouched
        assert torch.equal(value, before[name]), name
    ref = reference_full_step_loss(model, lam, x, y, teacher, x_meta, y_meta, lr)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    eps = 1e-6
    fd = torch.zeros_like(lam)
    for idx in torch.cartesian_prod(torch.arange(n), torch.arange(k + 1)).tolist():
        up, down = lam.clone(), lam.clone()
        up[tuple(idx)] += eps
        down[tuple(idx)] -= eps
        fd[tuple(idx)] = (reference_full_step_loss(model, up, x, y, teacher, x_meta, y_meta, lr)
                          - reference_full_step_loss(model, down, x, y, teacher, x_meta, y_meta,
                                                     lr)) / (2 * eps)
    assert grad.abs().max() > 1e-4
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-9)


def test_full_lookahead_of_a_linear_model_is_the_last_layer_path():
    p = _problem(k=2, seed=5)
    layer = nn.Linear(p.h.shape[1], p.weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(p.weight)
        layer.bias.copy_(p.bias)
    full = full_lookahead_meta_grad(layer, p.lam, p.h, p.y, p.teacher, p.h_meta, p.y_meta, 0.3, T)
    last = last_layer_meta_grad(p.lam, p.h, p.y, p.teacher, p.weight, p.bias, p.h_meta,
                                p.y_meta, 0.3, T)
    torch.testing.assert_close(full, last, rtol=1e-10, atol=1e-13)


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


class FakeCtx:
    """What the method reads from the running DistillModule, without a Trainer."""

    def __init__(self, dm, student, teachers, root, epoch=0, lr=0.05):
        self.student, self.teachers = student, teachers
        self.trainer = SimpleNamespace(datamodule=dm, is_global_zero=True,
                                       default_root_dir=str(root))
        self.current_epoch, self.current_lr, self.device = epoch, lr, torch.device("cpu")
        self.logged: dict[str, float] = {}

    @torch.no_grad()
    def teacher_outputs(self, x, paths=()):
        return [Outputs(t.eval()(x)) for t in self.teachers]

    def clean_train_teacher_outputs(self, batch):
        return self.teacher_outputs(batch["input"])

    def log(self, name, value, **_):
        self.logged[name] = float(value)

    def precision_context(self):
        return contextlib.nullcontext()


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
    method = ALMKD(combination=combination, lookahead=lookahead, meta_lr=1e5, meta_start=0,
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
            "alm/teacher1_noisy_mean"} <= set(ctx.logged)
    assert (tmp_path / "alm_mixing_weights.png").stat().st_size > 0
    mixing = method.results()["mixing"]
    assert mixing["meta_passes"] == 1
    noisy = dm.noise_mask
    assert mixing["label_weight_noisy"] == pytest.approx(float(table[noisy, 0].double().mean()))
    assert mixing["label_weight_clean"] == pytest.approx(float(table[~noisy, 0].double().mean()))


def test_setup_keeps_a_sized_table_and_rejects_no_teacher(tmp_path):
    dm = _digits()
    method = ALMKD()
    ctx = FakeCtx(dm, _cnn(8, 0), [_cnn(8, 1)], tmp_path)
    method.setup(ctx)
    method.mixing_weights[:3] = 7.0
    method.setup(ctx)
    assert (method.mixing_weights[:3] == 7.0).all()
    with pytest.raises(ValueError, match="needs at least one teacher"):
        ALMKD().setup(FakeCtx(dm, _cnn(8, 0), [], tmp_path))


def test_history_survives_checkpoints_and_earlier_restores():
    method = ALMKD()
    method.mixing_weights = initial_weights(6, 1, 0.9, "free")
    summary = torch.zeros(2, 3, 7, dtype=D64)
    method.history = [(-1, summary), (4, summary + 1)]
    early = copy.deepcopy(method.state_dict())  # e.g. the best-on-val checkpoint
    method.history.append((8, summary + 2))
    late = method.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in late.values())  # loadable as a teacher
    fresh = ALMKD()
    fresh.mixing_weights = initial_weights(6, 1, 0.9, "free")
    fresh.load_state_dict(late)  # resume in a new process: the whole record comes back
    assert [e for e, _ in fresh.history] == [-1, 4, 8]
    assert torch.equal(fresh.history[2][1], summary + 2)
    method.load_state_dict(early)  # restoring an earlier checkpoint forgets no pass
    assert [e for e, _ in method.history] == [-1, 4, 8]
    assert method.results()["mixing"]["meta_passes"] == 2


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


# -- (f) DDP: sync_rows over 2 gloo processes ----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ToyData:
    """The datamodule surface a meta pass reads, with the train loader sharded over ranks
    like kdlab's BatchSampler (rank r takes batches r, r + world, ...); no Lightning, so
    the spawned processes start fast."""

    def __init__(self, n=300, n_meta=50, d=6, c=4, seed=0, batch_size=16):
        g = torch.Generator().manual_seed(seed)
        self.x, self.y = torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)
        self.meta = SimpleNamespace(x=torch.randn(n_meta, d, generator=g),
                                    y=torch.randint(0, c, (n_meta,), generator=g))
        self.splits = {"meta": self}
        self.train_size, self.seed, self.batch_size, self.eval_batch_size = n, seed, batch_size, 64
        self.noise_mask = torch.rand(n, generator=g) < 0.3

    def __len__(self):
        return len(self.meta.y)

    def __getitem__(self, pos):
        return {"input": self.meta.x[pos], "target": self.meta.y[pos], "index": pos}

    def train_eval_dataloader(self, batch_size):
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
        for pos in list(torch.arange(self.train_size).split(batch_size))[rank::world]:
            yield {"input": self.x[pos], "target": self.y[pos], "index": pos}

    def model_batch(self, batch, device, train=False):
        return {k: v.to(device) for k, v in batch.items()}


def _toy_mlp(seed, d=6, c=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.ReLU(), nn.Linear(8, c))


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
        method = ALMKD(meta_start=0, meta_every=1, plot=False, inner_steps=2, chunk_batches=2)
        ctx = FakeCtx(ToyData(), _toy_mlp(0), [_toy_mlp(1), _toy_mlp(2)], out_dir)
        method.setup(ctx)
        method.on_train_epoch_start(ctx)
        torch.save({"sync": table, "meta": method.mixing_weights},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sync_rows_is_a_noop_without_distributed():
    table = torch.ones(4, 2)
    assert sync_rows(table, torch.tensor([True, False, True, False])) is table
    assert torch.equal(table, torch.ones(4, 2))


def test_sync_rows_gives_both_gloo_ranks_the_same_table(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    expected = torch.arange(20.0).reshape(10, 2)
    for rank in (0, 1):
        rows = torch.arange(rank, 10, 2)
        expected[rows] = -(rank + 1.0) * (rows[:, None].float() + 1)
    expected[9] = (torch.tensor(100.0) + -2.0 * 10) / 2  # both ranks: averaged
    assert torch.equal(r0["sync"], expected) and torch.equal(r1["sync"], expected)
    assert torch.equal(r0["meta"], r1["meta"])
    init = initial_weights(len(r0["meta"]), 2, 0.9, "free")
    assert (r0["meta"] != init).any(1).all()  # every row was updated by one of the ranks


# -- (e, g) end to end on noisy digits -----------------------------------------------------

COMMON = ["dataset=digits", "trainer=cpu", "trainer.max_epochs=2",
          "trainer.enable_progress_bar=false", "noise=symmetric", "noise.rate=0.4",
          "method=alm_kd", "method.meta_start=1", "method.meta_every=1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "kdlab_cache"  # shared with other method tests
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDLAB_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def single_teacher_run(cache_dir, tmp_path_factory):
    from kdlab.config import compose
    from kdlab.train import run

    cfg = compose([*COMMON, "student=cnn_small", "teacher=cnn"])
    out = tmp_path_factory.mktemp("alm_single") / "run"
    return cfg, out, run(cfg, out)


def _check_run_dir(out: Path, results: dict, columns: list[str]) -> None:
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["mixing"] == results["mixing"]
    mixing = on_disk["mixing"]
    assert mixing["meta_passes"] == 1
    for key in ("label_weight_clean", "label_weight_noisy", "teacher_weight_clean",
                "teacher_weight_noisy"):
        assert math.isfinite(mixing[key]), key
    assert on_disk["noise"]["type"] == "symmetric"
    assert on_disk["noise"]["realised_rate"] == pytest.approx(0.4 * 0.9, abs=0.05)
    assert (out / "alm_mixing_weights.png").stat().st_size > 0
    with open(out / "logs" / "metrics.csv") as f:
        header = next(csv.reader(f))
    for col in columns:
        assert f"alm/{col}_clean_mean" in header and f"alm/{col}_noisy_mean" in header


def test_single_teacher_noisy_digits_end_to_end(single_teacher_run):
    _, out, results = single_teacher_run
    assert results["method"] == "alm_kd" and results["epochs"] == 2
    _check_run_dir(out, results, ["label", "teacher"])


def test_resume_restores_the_weight_table(single_teacher_run, tmp_path):
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from kdlab.config import model_kwargs
    from kdlab.models import build_model
    from kdlab.module import DistillModule
    from kdlab.train import build_datamodule, build_method, build_teachers, build_trainer

    cfg, out, results = single_teacher_run
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    table = last["state_dict"]["method.mixing_weights"]
    dm = build_datamodule(cfg)
    assert table.shape == (dm.train_size, 2)
    assert (table != initial_weights(len(table), 1, 0.9, "free")).any()  # a pass happened
    # results describe the final table (the pass at epoch 1), not the best-on-val restore
    noisy = dm.noise_mask
    assert results["mixing"]["label_weight_noisy"] == pytest.approx(
        float(table[noisy, 0].double().mean()))
    assert results["mixing"]["teacher_weight_clean"] == pytest.approx(
        float(table[~noisy, 1].double().mean()))

    def fresh_module():
        method = build_method(cfg)
        student = build_model(cfg.student.name, dm.num_classes, dm.input_shape,
                              **model_kwargs(cfg.student))
        return DistillModule(student, method, build_teachers(cfg, dm), dm.num_classes,
                             optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
                             scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True))

    assert results["mixing"]["meta_passes"] == 1

    # a fresh module (setup sizes the table) restored from the checkpoint
    module = fresh_module()
    module.method.setup(FakeCtx(dm, module.student, list(module.teachers), tmp_path))
    module.load_state_dict(last["state_dict"])
    assert torch.equal(module.method.mixing_weights, table)
    assert module.method.results()["mixing"] == results["mixing"]  # history restored too

    # Lightning's own resume path: setup runs before the restore, nothing left to train
    module = fresh_module()
    trainer = build_trainer(cfg, tmp_path / "resumed", [])
    pl.seed_everything(0, verbose=False)
    trainer.fit(module, datamodule=dm, ckpt_path=str(out / "checkpoints" / "last.ckpt"),
                weights_only=True)
    assert torch.equal(module.method.mixing_weights, table)


def test_multi_teacher_experiment_end_to_end(cache_dir, tmp_path):
    from kdlab.config import compose
    from kdlab.train import run

    cfg = compose([*COMMON, "experiment=digits_alm_multi_teacher"])
    assert [t.name for t in cfg.teachers] == ["cnn", "mlp", "cnn"]
    results = run(cfg, tmp_path / "run")
    assert len(results["teachers"]) == 3
    assert len(results["mixing"]["teacher_weights_clean"]) == 3
    _check_run_dir(tmp_path / "run", results, ["label", "teacher0", "teacher1", "teacher2"])


def test_self_distill_experiment_uses_the_students_architecture():
    from kdlab.config import compose, model_kwargs

    cfg = compose(["experiment=digits_alm_self_distill"])
    assert cfg.method._target_ == "kdlab.methods.alm_kd.ALMKD"
    assert cfg.teacher.name == cfg.student.name
    assert model_kwargs(cfg.teacher) == model_kwargs(cfg.student)
    assert cfg.teacher.ckpt == "auto" and not cfg.get("teachers")
