"""The one-step lookahead engine (kdlab/methods/lookahead.py) that ALM-KD and TGeo-KD share:
meta-gradients against independent references (lookahead_references.py: autograd through an
explicit step, finite differences of a real SGD step), the centred kernel, the seeded chunks
and meta batches, the features it steps on, and the DDP merge without a process group
(with two gloo processes: test_alm_kd.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.context import tiny_bn_model
from lookahead_references import (
    D64,
    T,
    random_problem,
    reference_full_step_loss,
    reference_last_layer_step,
    reference_terms,
)
from torch import nn

from kdlab.methods.lookahead import (
    full_lookahead_meta_grad,
    last_layer_meta_grad,
    meta_pick,
    pass_chunks,
    penultimate_and_logits,
    sync_rows,
    term_logit_grads,
)

# -- (a) the closed-form last-layer meta-gradient ------------------------------------------


def test_term_logit_grads_match_autograd():
    p = random_problem(k=2)
    logits = (p.h @ p.weight.T + p.bias).requires_grad_(True)
    terms = reference_terms(logits, p.y, p.teacher, T)
    closed = term_logit_grads(logits.detach(), p.y, p.teacher, T)
    for j in range(terms.shape[1]):
        (auto,) = torch.autograd.grad(terms[:, j].sum(), logits, retain_graph=True)
        torch.testing.assert_close(closed[j], auto, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k,with_bias", [(1, True), (3, True), (2, False)])
def test_last_layer_meta_grad_matches_functional_step(k, with_bias):
    p = random_problem(k=k, seed=k)
    bias = p.bias if with_bias else None
    step = 0.07
    ref_loss, ref_grad = reference_last_layer_step(p.lam, p.h, p.y, p.teacher, p.weight, bias,
                                                   p.h_meta, p.y_meta, step)
    loss, grad = last_layer_meta_grad(p.lam, p.h, p.y, p.teacher, p.weight, bias, p.h_meta,
                                      p.y_meta, step, T)
    assert grad.shape == p.lam.shape and grad.dtype == D64
    assert grad.abs().max() > 1e-4  # a non-trivial problem
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-13)


# -- (b) the full lookahead ----------------------------------------------------------------


def test_full_lookahead_matches_finite_differences():
    model = tiny_bn_model(4, 5, 3)
    g = torch.Generator().manual_seed(1)
    n, m, k = 6, 7, 2
    x, x_meta = torch.randn(n, 4, generator=g, dtype=D64), torch.randn(m, 4, generator=g, dtype=D64)
    y, y_meta = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (m,), generator=g)
    teacher = 3 * torch.randn(k, n, 3, generator=g, dtype=D64)
    lam = torch.rand(n, k + 1, generator=g, dtype=D64) + 0.1
    lr = 0.08
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
    p = random_problem(k=2, seed=5)
    layer = nn.Linear(p.h.shape[1], p.weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(p.weight)
        layer.bias.copy_(p.bias)
    full = full_lookahead_meta_grad(layer, p.lam, p.h, p.y, p.teacher, p.h_meta, p.y_meta,
                                    0.03, T)
    last = last_layer_meta_grad(p.lam, p.h, p.y, p.teacher, p.weight, p.bias, p.h_meta,
                                p.y_meta, 0.03, T)
    torch.testing.assert_close(full, last, rtol=1e-10, atol=1e-13)


# -- (c) the centred kernel ------------------------------------------------------------------


def test_centered_kernel_is_a_step_of_W_on_centred_features_with_fixed_biases():
    p = random_problem(k=2, seed=7)
    step, scale = 0.03, 2.5
    _, grad = last_layer_meta_grad(p.lam, p.h, p.y, p.teacher, p.weight, p.bias, p.h_meta,
                                   p.y_meta, step, T, kernel="centered", kernel_scale=scale)
    # reference: the layer's logits plus a linear correction V phi(h), V = 0, on the features
    # phi(h) = (h - mean(h_meta)) sqrt(scale / mean_v |h_v - mean|^2); only V is stepped
    mu = p.h_meta.mean(0)
    norm = ((p.h_meta - mu) ** 2).sum(1).mean()
    phi, phi_m = (p.h - mu) * (scale / norm).sqrt(), (p.h_meta - mu) * (scale / norm).sqrt()
    lam = p.lam.clone().requires_grad_(True)
    v = torch.zeros(p.weight.shape, dtype=D64, requires_grad=True)
    logits = p.h @ p.weight.T + p.bias + phi @ v.T
    loss = (lam * reference_terms(logits, p.y, p.teacher, T)).sum()
    (gv,) = torch.autograd.grad(loss, v, create_graph=True)
    meta = F.cross_entropy(p.h_meta @ p.weight.T + p.bias + phi_m @ (v - step * gv).T, p.y_meta)
    (ref,) = torch.autograd.grad(meta, lam)
    assert ref.abs().max() > 1e-4
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)
    # the common component is gone: features shifted by a constant give the same gradient
    _, shifted = last_layer_meta_grad(p.lam, p.h + 5.0, p.y, p.teacher, p.weight,
                                      p.bias - p.weight @ torch.full((p.h.shape[1],), 5.0,
                                                                     dtype=D64),
                                      p.h_meta + 5.0, p.y_meta, step, T, kernel="centered",
                                      kernel_scale=scale)
    torch.testing.assert_close(shifted, grad, rtol=1e-8, atol=1e-12)


# -- (d) the seeded draws of a pass, the features, DDP without a process group ----------------


def test_chunks_are_a_seeded_permutation_shared_out_over_ranks():
    one = pass_chunks(100, 16, seed=3, epoch=5)
    assert torch.equal(torch.cat([c for _, c in one]).sort().values, torch.arange(100))
    assert [len(c) for _, c in one] == [16] * 6 + [4]
    for world in (2, 3):
        shards = [pass_chunks(100, 16, 3, 5, rank, world) for rank in range(world)]
        merged = sorted((i, c.tolist()) for shard in shards for i, c in shard)
        assert merged == [(i, c.tolist()) for i, c in one]  # the same chunks, shared out
    assert torch.equal(torch.cat([c for _, c in pass_chunks(100, 16, 3, 5)]),
                       torch.cat([c for _, c in one]))  # on resume
    other = torch.cat([c for _, c in pass_chunks(100, 16, 3, 6)])
    assert not torch.equal(other, torch.cat([c for _, c in one]))  # reshuffled every pass
    assert torch.equal(meta_pick(50, 100, 0, 1, 2), torch.arange(50))
    pick = meta_pick(500, 100, 0, 1, 2)
    assert len(pick) == 100 and len(set(pick.tolist())) == 100
    assert torch.equal(pick, meta_pick(500, 100, 0, 1, 2))
    assert not torch.equal(pick, meta_pick(500, 100, 0, 1, 3))


def test_the_features_are_the_last_layers_input_and_the_logits():
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(0))
    h, logits = penultimate_and_logits(model, x)
    expected_h = torch.relu(model[1](x.flatten(1)))
    torch.testing.assert_close(h, expected_h)
    torch.testing.assert_close(logits, expected_h @ model[3].weight.T + model[3].bias)
    assert h.dtype == logits.dtype == torch.float32
    h64, logits64 = penultimate_and_logits(model.double(), x.double())
    assert h64.dtype == logits64.dtype == D64  # float64 stays (the tests' precision)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h16, logits16 = penultimate_and_logits(model.float(), x)
    assert h16.dtype == logits16.dtype == torch.float32  # bf16 autocast: float32 to work in


def test_sync_rows_is_a_noop_without_distributed():
    table = torch.ones(4, 2)
    assert sync_rows(table, torch.tensor([True, False, True, False])) is table
    assert torch.equal(table, torch.ones(4, 2))
