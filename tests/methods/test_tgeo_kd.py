"""TGeo-KD: the loss against a float64 numpy implementation, the geometry features and the
class means against hand computations, the hypergradient against autograd through an
explicit functional step (last layer) and finite differences of a real SGD step (whole
student), the controller's Adam (torch.optim.Adam, its state in buffers) against Adam's
update written out here and against torch.optim.Adam, edge cases, which parts get
gradients, exact save / restore of the controller and its optimiser state, and DDP (two
gloo ranks end with the same controller).

The references here never call the method's own feature, MLP, loss or lookahead code.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.context import FakeContext, tiny_bn_model
from helpers.gloo import gloo_ranks
from loss_cases import CASES, make_inputs
from torch import nn

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.lookahead import full_lookahead_meta_loss, last_layer_meta_loss
from kdlab.methods.tgeo_kd import TGeoKD, geometry_features, hypergradient

D64 = torch.float64
SLOPE = 0.01  # LeakyReLU's default negative slope


# -- independent references ----------------------------------------------------------------


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_features(s_probs, t_probs, y, means):
    """The nine blocks, written out per example."""
    rows = []
    for i in range(len(y)):
        S, T = s_probs[i], t_probs[i]
        G = np.eye(len(S))[y[i]]
        B = means[y[i]]
        rows.append(np.concatenate([S, T, G, B, (B - S) ** 2, (G - S) ** 2, (T - S) ** 2,
                                    (T - G) ** 2, (B - G) ** 2]))
    return np.stack(rows)


def np_mlp(state, x):
    """sigmoid(W3 lrelu(W2 lrelu(W1 x + b1) + b2) + b3) in float64 numpy."""
    w = {k: v.detach().double().numpy() for k, v in state.items()}

    def lrelu(z):
        return np.where(z > 0, z, SLOPE * z)

    h = lrelu(x @ w["0.weight"].T + w["0.bias"])
    h = lrelu(h @ w["2.weight"].T + w["2.bias"])
    z = (h @ w["4.weight"].T + w["4.bias"])[:, 0]
    return 1.0 / (1.0 + np.exp(-z))


def np_loss(s, t, y, alpha, temperature):
    """(mean alpha T^2 KL, mean (1 - alpha) CE), example by example."""
    kd = ce = 0.0
    for i in range(len(y)):
        log_q = np_log_softmax(t[i] / temperature)
        log_p = np_log_softmax(s[i] / temperature)
        kl = float((np.exp(log_q) * (log_q - log_p)).sum())
        kd += alpha[i] * temperature ** 2 * kl
        ce += (1 - alpha[i]) * -np_log_softmax(s[i])[y[i]]
    return kd / len(y), ce / len(y)


def mlp(params, x):
    """The controller written out in torch (params: w1, b1, w2, b2, w3, b3)."""
    w1, b1, w2, b2, w3, b3 = params
    h = F.leaky_relu(x @ w1.T + b1, SLOPE)
    h = F.leaky_relu(h @ w2.T + b2, SLOPE)
    return torch.sigmoid((h @ w3.T + b3)[:, 0])


def per_example_loss(logits, y, teacher_logits, alpha, temperature):
    ce = F.cross_entropy(logits, y, reduction="none")
    kl = F.kl_div(F.log_softmax(logits / temperature, -1),
                  F.log_softmax(teacher_logits / temperature, -1), log_target=True,
                  reduction="none").sum(-1) * temperature ** 2
    return alpha * kl + (1 - alpha) * ce


def reference_last_layer_hypergradient(params, feats, h, y, teacher_logits, weight, bias,
                                       h_meta, y_meta, lr, temperature):
    """Autograd through an explicit SGD step W' = W - lr grad_W mean_i loss_i (and b)."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    w = weight.detach().clone().requires_grad_(True)
    b = bias.detach().clone().requires_grad_(True)
    alpha = mlp(params, feats)
    loss = per_example_loss(F.linear(h, w, b), y, teacher_logits, alpha, temperature).mean()
    gw, gb = torch.autograd.grad(loss, [w, b], create_graph=True)
    meta = F.cross_entropy(F.linear(h_meta, w - lr * gw, b - lr * gb), y_meta)
    return meta.detach(), torch.autograd.grad(meta, params)


def reference_full_step_meta_loss(params, model, feats, x, y, teacher_logits, x_meta, y_meta,
                                  lr, temperature):
    """The meta CE after a real SGD step of a copy of the model (eval mode, nn API)."""
    with torch.no_grad():
        alpha = mlp(params, feats)
    model = copy.deepcopy(model).eval()
    per_example_loss(model(x), y, teacher_logits, alpha, temperature).mean().backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
        return F.cross_entropy(model(x_meta), y_meta)


# -- set-up helpers ------------------------------------------------------------------------


def linear_net(d, c, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, c)).to(dtype)


def toy_data(n_train=12, n_meta=9, d=5, c=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {split: (torch.randn(n, d, generator=g).to(dtype),
                    torch.randint(0, c, (n,), generator=g))
            for split, n in (("train", n_train), ("meta", n_meta))}


def make_method(c=4, d=5, dtype=torch.float32, data=None, lr=0.3, seed=3, student=None,
                controller_scale=None, **options):
    """A set-up method (class means computed) on a linear student and teacher."""
    data = data if data is not None else toy_data(c=c, d=d, dtype=dtype)
    student = student if student is not None else linear_net(d, c, 1, dtype)
    teacher = linear_net(d, c, 2, dtype).eval()
    with torch.no_grad():
        teacher[1].weight.mul_(3)  # a teacher with opinions
    ctx = FakeContext(student, (teacher,), num_classes=c, data=data, batch_size=6,
                      current_lr=lr, seed=seed, global_step=1)
    method = TGeoKD(**options)
    method.setup(ctx)
    method.to(dtype)
    if controller_scale:  # make alpha vary a lot between examples (output bias kept)
        with torch.no_grad():
            for p in list(method.controller.parameters())[:-1]:
                p.mul_(controller_scale)
    method.on_fit_start(ctx)
    return method, ctx


def controller_params(method):
    return [p.detach().clone() for p in method.controller.parameters()]


# -- (a) the loss --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_float64_reference(case):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap, batch=9, teacher_offset=1)
    method, _ = make_method(c=classes, controller_scale=4.0, temperature=temperature)
    g = torch.Generator().manual_seed(1)
    method.class_means.copy_(torch.softmax(torch.randn(classes, classes, generator=g), -1))
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert set(terms) == {"kd", "ce"}
    sn, tn, yn = s.double().numpy(), t.double().numpy(), y.numpy()
    feats = np_features(np_softmax(sn), np_softmax(tn), yn, method.class_means.double().numpy())
    alpha = np_mlp(method.controller.state_dict(), feats)
    assert alpha.std() > 0.01  # a non-trivial ratio per example
    kd, ce = np_loss(sn, tn, yn, alpha, temperature)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5, abs=1e-6)


def test_released_double_softmax_is_ce_of_the_softmax_output_by_hand():
    """The released lower-level loss: CrossEntropyLoss on softmax(s), i.e. per example
    -p_y + log sum_c exp(p_c) with p = softmax(s); the KD term is unchanged."""
    s, t, y = make_inputs(10, 3.0, 0.0, batch=9, teacher_offset=1)
    method, _ = make_method(c=10, controller_scale=4.0, released_double_softmax=True)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    sn, yn = s.double().numpy(), y.numpy()
    alpha = method.alpha(s, t, y).double().numpy()
    ce = 0.0
    for i in range(len(yn)):
        p = np.exp(sn[i] - sn[i].max())
        p /= p.sum()
        double = -p[yn[i]] + np.log(np.exp(p).sum())
        assert np.log(np.e + 9) - 1 <= double <= np.log(np.e + 9)  # the bounds in the docstring
        ce += (1 - alpha[i]) * double
    assert terms["ce"].item() == pytest.approx(ce / len(yn), rel=1e-5, abs=1e-6)
    kd, _ = np_loss(sn, t.double().numpy(), yn, alpha, method.temperature)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5, abs=1e-6)


def test_initial_ratio_is_init_alpha_and_the_loss_is_kd():
    s, t, y = make_inputs(10, 3.0, 0.0, batch=16)
    method, _ = make_method(c=10)
    alpha = method.alpha(s, t, y)
    assert alpha.mean().item() == pytest.approx(0.9, abs=0.02)
    default, _ = make_method(c=10, init_alpha=None)  # PyTorch's default output bias
    assert abs(default.alpha(s, t, y).mean().item() - 0.5) < 0.2


# -- (b) features and class means ----------------------------------------------------------


def test_geometry_features_by_hand():
    s = torch.tensor([[0.5, 0.3, 0.2]], dtype=D64)
    t = torch.tensor([[0.7, 0.2, 0.1]], dtype=D64)
    means = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]], dtype=D64)
    got = geometry_features(s, t, torch.tensor([0]), means)
    expected = [0.5, 0.3, 0.2,  # S
                0.7, 0.2, 0.1,  # T
                1.0, 0.0, 0.0,  # G
                0.6, 0.3, 0.1,  # Tbar_0
                0.01, 0.0, 0.01,  # (Tbar - S)^2
                0.25, 0.09, 0.04,  # (G - S)^2
                0.04, 0.01, 0.01,  # (T - S)^2
                0.09, 0.04, 0.01,  # (T - G)^2
                0.16, 0.09, 0.01]  # (Tbar - G)^2
    torch.testing.assert_close(got, torch.tensor([expected], dtype=D64), rtol=0, atol=1e-15)
    # label 2 picks the third class mean
    got2 = geometry_features(s, t, torch.tensor([2]), means)
    torch.testing.assert_close(got2[0, 9:12], means[2])
    torch.testing.assert_close(got2[0, 6:9], torch.tensor([0.0, 0.0, 1.0], dtype=D64))


def test_class_means_are_the_teachers_mean_prediction_per_training_label():
    # labels 0, 0, 1, 1, 1, 3: class 2 has no example
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [-1.0, 2.0],
                      [3.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    teacher = nn.Linear(2, 4).eval()
    ctx = FakeContext(linear_net(2, 4, 0), (teacher,), num_classes=4,
                      data={"train": (x, y), "meta": (x, y)})
    method = TGeoKD(class_means_batch_size=4)  # several lookups
    method.setup(ctx)
    method.on_fit_start(ctx)
    with torch.no_grad():
        p = torch.softmax(teacher(x).double(), -1)
    expected = torch.stack([(p[0] + p[1]) / 2, (p[2] + p[3] + p[4]) / 3,
                            torch.full((4,), 0.25, dtype=D64), p[5]]).float()
    torch.testing.assert_close(method.class_means, expected, rtol=1e-6, atol=1e-7)
    assert bool(method.has_class_means)
    method.class_means[0, 0] = 7.0
    method.on_fit_start(ctx)  # computed once: a resumed run keeps its means
    assert method.class_means[0, 0] == 7.0


# -- (c) the hypergradient -----------------------------------------------------------------


def _lookahead_problem(n=7, d=5, c=4, m=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats_probs = (torch.softmax(torch.randn(n, c, generator=g, dtype=D64) * 2, -1),
                   torch.softmax(torch.randn(n, c, generator=g, dtype=D64) * 2, -1))
    y = torch.randint(0, c, (n,), generator=g)
    means = torch.softmax(torch.randn(c, c, generator=g, dtype=D64), -1)
    return dict(
        feats=geometry_features(*feats_probs, y, means), y=y,
        h=torch.randn(n, d, generator=g, dtype=D64),
        teacher=3 * torch.randn(n, c, generator=g, dtype=D64),
        weight=torch.randn(c, d, generator=g, dtype=D64),
        bias=torch.randn(c, generator=g, dtype=D64),
        h_meta=torch.randn(m, d, generator=g, dtype=D64),
        y_meta=torch.randint(0, c, (m,), generator=g))


def _controller(c, seed=0, scale=3.0):
    from kdlab.methods.tgeo_kd import make_controller

    net = make_controller(c, 0.7, seed).double()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


@pytest.mark.parametrize("seed", [0, 1])
def test_last_layer_hypergradient_matches_an_explicit_functional_step(seed):
    p = _lookahead_problem(seed=seed)
    net = _controller(4, seed)
    lr, n = 0.4, len(p["y"])
    meta_loss, grads = hypergradient(net, p["feats"], lambda lam: last_layer_meta_loss(
        lam, p["h"], p["y"], p["teacher"][None], p["weight"], p["bias"], p["h_meta"],
        p["y_meta"], lr / n, 4.0))
    ref_loss, ref_grads = reference_last_layer_hypergradient(
        list(net.parameters()), p["feats"], p["h"], p["y"], p["teacher"], p["weight"],
        p["bias"], p["h_meta"], p["y_meta"], lr, 4.0)
    torch.testing.assert_close(meta_loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert max(g.abs().max() for g in ref_grads) > 1e-4  # not a vacuous comparison
    for got, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-13)
    assert all(not q.requires_grad for q in net.parameters())  # the module is left frozen


def test_full_lookahead_hypergradient_matches_finite_differences():
    p = _lookahead_problem(seed=2)
    model, net = tiny_bn_model(5, 6, 4), _controller(4, 2)
    g = torch.Generator().manual_seed(3)
    x, x_meta = (torch.randn(7, 5, generator=g, dtype=D64),
                 torch.randn(6, 5, generator=g, dtype=D64))
    lr = 0.5
    before = {k: v.clone() for k, v in model.state_dict().items()}
    meta_loss, grads = hypergradient(net, p["feats"], lambda lam: full_lookahead_meta_loss(
        model, lam, x, p["y"], p["teacher"][None], x_meta, p["y_meta"], lr / 7, 4.0))
    assert model.training
    for name, value in model.state_dict().items():  # weights and BN statistics untouched
        assert torch.equal(value, before[name]), name
    params = [q.detach().clone() for q in net.parameters()]

    def loss_at(ps):
        return reference_full_step_meta_loss(ps, model, p["feats"], x, p["y"], p["teacher"],
                                             x_meta, p["y_meta"], lr, 4.0)

    torch.testing.assert_close(meta_loss, loss_at(params), rtol=1e-12, atol=1e-12)
    eps = 1e-6
    for _ in range(2):  # directional derivatives along random directions
        v = [torch.randn(q.shape, generator=g, dtype=D64) for q in params]
        up = loss_at([q + eps * dv for q, dv in zip(params, v, strict=True)])
        down = loss_at([q - eps * dv for q, dv in zip(params, v, strict=True)])
        fd = (up - down) / (2 * eps)
        analytic = sum((gr * dv).sum() for gr, dv in zip(grads, v, strict=True))
        assert abs(float(analytic)) > 1e-5
        assert float(analytic) == pytest.approx(float(fd), rel=1e-5, abs=1e-9)


def test_full_lookahead_of_a_linear_student_is_the_last_layer_path():
    p = _lookahead_problem(seed=4)
    layer = nn.Linear(5, 4).double()
    with torch.no_grad():
        layer.weight.copy_(p["weight"])
        layer.bias.copy_(p["bias"])
    net = _controller(4, 4)
    step = 0.05
    _, full = hypergradient(net, p["feats"], lambda lam: full_lookahead_meta_loss(
        layer, lam, p["h"], p["y"], p["teacher"][None], p["h_meta"], p["y_meta"], step, 4.0))
    _, last = hypergradient(net, p["feats"], lambda lam: last_layer_meta_loss(
        lam, p["h"], p["y"], p["teacher"][None], p["weight"], p["bias"], p["h_meta"],
        p["y_meta"], step, 4.0))
    for a, b in zip(full, last, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("lookahead", ["last_layer", "full"])
def test_controller_update_is_adam_on_the_hypergradient_over_lr(lookahead):
    """The whole update against the references: features of the student's eval-mode
    outputs, the step the student takes (lr x the batch mean), the meta split, and
    torch.optim.Adam on dL_meta/dphi / lr. The student is linear, so the full lookahead
    is the same explicit step of W and b."""
    data = toy_data(dtype=D64)
    method, ctx = make_method(dtype=D64, data=data, lr=0.3, controller_scale=3.0,
                              meta_batch_size=100, controller_lr=0.01,
                              controller_weight_decay=0.01, lookahead=lookahead)
    index = torch.tensor([0, 3, 5, 7, 8, 11])
    before = controller_params(method)
    method.controller_update(ctx, index, step=1)
    student, teacher = ctx.student, ctx.teachers[0]
    x, y = data["train"][0][index], data["train"][1][index]
    with torch.no_grad():
        feats = torch.from_numpy(np_features(
            np_softmax(student(x).numpy()), np_softmax(teacher(x).numpy()), y.numpy(),
            method.class_means.numpy()))
        t_logits = teacher(x)
    _, ref_grads = reference_last_layer_hypergradient(
        before, feats, x, y, t_logits, student[1].weight, student[1].bias, data["meta"][0],
        data["meta"][1], 0.3, 4.0)
    expected = [q.clone().requires_grad_(True) for q in before]
    opt = torch.optim.Adam(expected, lr=0.01, weight_decay=0.01)
    for q, gr in zip(expected, ref_grads, strict=True):
        q.grad = gr / 0.3
    opt.step()
    for got, ref in zip(method.controller.parameters(), expected, strict=True):
        torch.testing.assert_close(got, ref.detach(), rtol=1e-10, atol=1e-12)
    assert int(method.controller_steps) == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, controller_params(method),
                                                   strict=True))
    assert "tgeo/meta_loss" in ctx.logged


def test_the_controller_step_is_adam_with_its_state_in_the_buffers():
    """controller_step against Adam's update written out (float64, L2 weight decay added to
    the gradient, bias-corrected moments): the parameters, and the moments and step count
    kept in the buffers, step after step, also across a save and restore."""
    method, _ = make_method(dtype=D64, controller_lr=0.02, controller_betas=(0.8, 0.99),
                            controller_eps=1e-7, controller_weight_decay=0.05)
    theta = torch.cat([q.reshape(-1) for q in controller_params(method)])
    m, v = torch.zeros_like(theta), torch.zeros_like(theta)
    g = torch.Generator().manual_seed(0)
    for t in range(1, 7):
        grad = torch.randn(theta.shape, generator=g, dtype=D64) * 10.0 ** (t - 4)
        if t == 4:  # a method restored from the checkpoint continues the same steps
            state = copy.deepcopy(method.state_dict())
            method = TGeoKD(controller_lr=0.02, controller_betas=(0.8, 0.99),
                            controller_eps=1e-7, controller_weight_decay=0.05)
            method.load_state_dict(state)  # built from the checkpoint's shapes, in float32:
            method.to(D64).load_state_dict(state)  # as this test's float64, exactly
        method.controller_step(grad.clone())
        full = grad + 0.05 * theta
        m = 0.8 * m + 0.2 * full
        v = 0.99 * v + 0.01 * full * full
        theta = theta - 0.02 / (1 - 0.8 ** t) * m / (torch.sqrt(v / (1 - 0.99 ** t)) + 1e-7)
        got = torch.cat([q.reshape(-1) for q in controller_params(method)])
        torch.testing.assert_close(got, theta, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(method.controller_exp_avg, m, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(method.controller_exp_avg_sq, v, rtol=1e-12, atol=1e-18)
        assert int(method.controller_steps) == t
    assert all(q.grad is None and not q.requires_grad for q in method.controller.parameters())


# -- (d) edge cases ------------------------------------------------------------------------


def _reference_terms(method, s, t, y):
    sn, tn, yn = s.double().numpy(), t.double().numpy(), y.numpy()
    feats = np_features(np_softmax(sn), np_softmax(tn), yn, method.class_means.double().numpy())
    return np_loss(sn, tn, yn, np_mlp(method.controller.state_dict(), feats),
                   method.temperature)


def test_bf16_logits():
    s, t, y = make_inputs(10, 3.0, 0.0, batch=8)
    s, t = s.bfloat16(), t.bfloat16()
    method, _ = make_method(c=10, controller_scale=3.0)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    kd, ce = _reference_terms(method, s, t, y)  # of the bf16-rounded values
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5, abs=1e-6)


def test_one_class_in_the_batch_and_in_the_meta_step():
    s, t, _ = make_inputs(4, 2.0, 0.0, batch=6)
    y = torch.full((6,), 2)
    data = toy_data()
    data["train"] = (data["train"][0], torch.full((12,), 2))
    method, ctx = make_method(data=data, controller_scale=3.0)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    kd, ce = _reference_terms(method, s, t, y)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5, abs=1e-6)
    assert torch.isfinite(method.controller_update(ctx, torch.arange(6), 1))
    assert all(torch.isfinite(q).all() for q in method.controller.parameters())


def test_a_very_confident_teacher():
    s, _, y = make_inputs(10, 3.0, 0.0, batch=8)
    t = torch.full((8, 10), -1e4)
    t[torch.arange(8), (y + 1) % 10] = 1e4  # certain, and of the wrong class
    method, ctx = make_method(c=10)
    terms = method.loss_terms(Outputs(s), [Outputs(t)], {"target": y})
    assert all(torch.isfinite(v) for v in terms.values())
    kd, ce = _reference_terms(method, s, t, y)
    assert terms["kd"].item() == pytest.approx(kd, rel=1e-5, abs=1e-6)
    # the teacher of the meta step as certain: finite hypergradient and update
    with torch.no_grad():
        ctx.teachers[0][1].weight.mul_(1e4)
    assert torch.isfinite(method.local_hypergradient(ctx, torch.arange(6), 1)[1]).all()


# -- (e) gradients -------------------------------------------------------------------------


def test_gradients_student_from_the_loss_teacher_never_controller_only_from_the_meta_step():
    data = toy_data()
    method, ctx = make_method(data=data)
    student, teacher = ctx.student, ctx.teachers[0]
    teacher.requires_grad_(True)  # left trainable on purpose
    assert method.extra_parameters() == []  # nothing joins the student's optimiser
    x, y = data["train"][0][:6], data["train"][1][:6]
    terms = method.loss_terms(Outputs(student(x)), ctx.teacher_outputs(x),
                              {"target": y, "index": torch.arange(6)})
    sum(terms.values()).backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in student.parameters())
    assert all(q.grad is None for q in teacher.parameters())
    assert all(q.grad is None and not q.requires_grad for q in method.controller.parameters())
    # the meta step moves the controller only, and leaves the student's mode alone
    student_before = copy.deepcopy(student.state_dict())
    teacher_before = copy.deepcopy(teacher.state_dict())
    before = controller_params(method)
    student.train()
    method.on_train_batch_end(ctx, {"index": torch.arange(6)})
    assert student.training
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(before, controller_params(method),
                                                   strict=True))
    assert {"tgeo/alpha_mean", "tgeo/meta_loss"} <= set(ctx.logged)


def test_meta_interval():
    method, ctx = make_method(meta_interval=3)
    updates = []
    for step in range(1, 8):
        ctx.global_step = step
        method.on_train_batch_end(ctx, {"index": torch.arange(6)})
        updates.append(int(method.controller_steps))
    assert updates == [0, 0, 1, 1, 1, 2, 2]
    frozen, ctx = make_method(meta_interval=0)  # never: the released code's fixed MLP
    before = controller_params(frozen)
    frozen.on_train_batch_end(ctx, {"index": torch.arange(6)})
    assert all(torch.equal(a, b) for a, b in zip(before, controller_params(frozen),
                                                 strict=True))


# -- (f) state -----------------------------------------------------------------------------


def _run_updates(method, ctx, steps):
    for step in steps:
        ctx.global_step = step
        method.on_train_batch_end(ctx, {"index": torch.arange(step % 6, step % 6 + 6)})


@pytest.mark.parametrize("set_up_first", [True, False])
def test_controller_and_its_optimiser_state_are_saved_and_restored_exactly(set_up_first):
    data = toy_data()
    method, ctx = make_method(data=data)
    _run_updates(method, ctx, [1, 2, 3])
    state = copy.deepcopy(method.state_dict())
    assert {"controller.0.weight", "controller.4.bias", "controller_exp_avg",
            "controller_exp_avg_sq", "controller_steps", "class_means",
            "has_class_means"} <= set(state)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert int(state["controller_steps"]) == 3 and state["controller_exp_avg_sq"].abs().sum() > 0

    fresh = TGeoKD()
    if set_up_first:  # Lightning's resume: setup builds the parts, then the checkpoint loads
        fresh.setup(FakeContext(ctx.student, ctx.teachers, num_classes=4, data=data,
                                seed=99))
    fresh.load_state_dict(state)  # without setup: built from the checkpoint's shapes
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    # both continue identically
    fresh.setup(ctx)
    fresh.on_fit_start(ctx)  # keeps the restored class means
    _run_updates(method, ctx, [4, 5])
    _run_updates(fresh, ctx, [4, 5])
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, method.state_dict()[key]), key


def test_a_checkpoint_loads_into_an_unbuilt_method_without_the_controller():
    """DistillModule.load_from_checkpoint (kdlab eval) drops the weights of method parts
    setup() has not built: the buffers must still load, and the student is all it needs."""
    method, ctx = make_method()
    _run_updates(method, ctx, [1])
    state = {k: v for k, v in method.state_dict().items() if not k.startswith("controller.")}
    fresh = TGeoKD()
    fresh.load_state_dict(state)
    assert fresh.controller is None
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_results_report_the_ratio_by_noise_group():
    data = toy_data()
    method, ctx = make_method(data=data)
    method._noise_mask = torch.tensor([True, False] * 6)
    alpha = torch.linspace(0.1, 0.9, 12)
    method.report_alpha.copy_(alpha)
    method.report_alpha[5] = float("nan")  # never trained on
    mixing = method.results()["mixing"]
    seen = torch.ones(12, dtype=torch.bool)
    seen[5] = False
    noisy = method._noise_mask & seen
    clean = ~method._noise_mask & seen
    assert mixing["examples"] == 11
    assert mixing["teacher_weight_noisy"] == pytest.approx(float(alpha[noisy].mean()))
    assert mixing["label_weight_clean"] == pytest.approx(1 - float(alpha[clean].mean()))
    # label weight 1 - alpha; of the 5 x 6 (noisy, clean) pairs of seen rows, 12 have the
    # noisy weight lower (counted by hand from the linspace): AUROC 12 / 30
    lw = 1 - alpha
    lower = sum(float(lw[i] < lw[j]) for i in range(12) for j in range(12)
                if noisy[i] and clean[j])
    assert lower == 12
    assert mixing["noise_auroc"] == pytest.approx(12 / 30)
    # the loss records each example's ratio, gathered in on_train_batch_end
    s, t, y = make_inputs(4, 2.0, 0.0, batch=6)
    method.loss_terms(Outputs(s), [Outputs(t)], {"target": y, "index": torch.arange(6, 12)})
    method._record_alpha(ctx)
    torch.testing.assert_close(method.report_alpha[6:], method.alpha(s, t, y))


def test_config_errors():
    with pytest.raises(ConfigError, match="lookahead"):
        TGeoKD(lookahead="two_steps")
    with pytest.raises(ConfigError, match="init_alpha"):
        TGeoKD(init_alpha=1.0)
    with pytest.raises(ConfigError, match="exactly 1 teacher"):
        TGeoKD().check(linear_net(5, 4, 0), [linear_net(5, 4, 1), linear_net(5, 4, 2)])
    with pytest.raises(ConfigError, match="final linear layer"):
        TGeoKD().check(nn.Sequential(nn.Flatten(), nn.Tanh()), [linear_net(5, 4, 1)])


# -- (g) DDP: two gloo ranks ---------------------------------------------------------------

DDP_DATA = dict(n_train=24, n_meta=40, seed=5)  # meta batches of 16 differ by rank
DDP_STEPS = (1, 2, 3)


class GatherContext(FakeContext):
    def all_gather(self, tensor):
        import torch.distributed as dist

        out = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor.contiguous())
        return torch.stack(out)


def _rank_batch(step, rank):
    return torch.arange(12 * rank + step, 12 * rank + step + 6)


def _ddp_method(rank, world, ctx_type=FakeContext):
    data = toy_data(**DDP_DATA)
    method, ctx = make_method(data=data, meta_batch_size=16)
    return method, ctx_type(ctx.student, ctx.teachers, num_classes=4, data=data,
                            batch_size=6, current_lr=0.3, seed=3, global_rank=rank,
                            world_size=world)


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        method, ctx = _ddp_method(rank, world, GatherContext)
        for step in DDP_STEPS:
            ctx.global_step = step
            method.on_train_batch_end(ctx, {"index": _rank_batch(step, rank)})
        torch.save(method.state_dict(), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_end_with_the_same_controller(tmp_path):
    gloo_ranks(_ddp_worker, tmp_path)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    # one process: the mean of the two ranks' hypergradients, then the same Adam step
    method, _ = _ddp_method(0, 1)
    ranks = [_ddp_method(r, 2)[1] for r in (0, 1)]
    init = controller_params(method)
    for step in DDP_STEPS:
        grads = [method.local_hypergradient(c, _rank_batch(step, c.global_rank), step)[1]
                 for c in ranks]
        method.controller_step((grads[0] + grads[1]) / 2)
    assert not torch.equal(grads[0], grads[1])  # the ranks did see different data
    for key, value in method.state_dict().items():
        torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert any(not torch.equal(a, b) for a, b in zip(init, controller_params(method),
                                                   strict=True))
    assert math.isfinite(float(r0["controller_exp_avg"].abs().sum()))
