"""Independent references for the one-step lookahead (kdlab/methods/lookahead.py), shared by
test_lookahead.py and test_alm_kd.py: computed from scratch with autograd on per-term losses
(torch's own cross-entropy and KL), never with the method's closed forms."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F

T = 4.0
D64 = torch.float64


def reference_terms(logits, target, teacher_logits, temperature):
    """(n, K+1) per-example CE and T^2 KL(p_t || p_s), with torch's own loss functions."""
    ce = F.cross_entropy(logits, target, reduction="none")
    log_p_s = F.log_softmax(logits / temperature, dim=-1)
    kls = [F.kl_div(log_p_s, F.log_softmax(t / temperature, dim=-1), log_target=True,
                    reduction="none").sum(-1) * temperature ** 2 for t in teacher_logits]
    return torch.stack([ce, *kls], dim=1)


def reference_last_layer_step(lam, h, y, teacher_logits, weight, bias, h_meta, y_meta, step):
    """Meta loss and dL/dlambda by autograd through an explicit functional SGD step of the
    summed loss with a per-example step ``step``."""
    lam = lam.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    params = [w]
    b = None
    if bias is not None:
        b = bias.clone().requires_grad_(True)
        params.append(b)
    logits = F.linear(h, w, b)
    loss = (lam * reference_terms(logits, y, teacher_logits, T)).sum()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    w1 = w - step * grads[0]
    b1 = None if b is None else b - step * grads[1]
    meta_loss = F.cross_entropy(F.linear(h_meta, w1, b1), y_meta)
    (grad,) = torch.autograd.grad(meta_loss, lam)
    return meta_loss.detach(), grad


def reference_full_step_loss(model, lam, x, y, teacher_logits, x_meta, y_meta, step):
    """Meta loss after a real SGD step (per-example step ``step`` on the summed loss) on a
    copy of the model (eval mode, nn API)."""
    model = copy.deepcopy(model).eval()
    loss = (lam * reference_terms(model(x), y, teacher_logits, T)).sum()
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= step * p.grad
        return F.cross_entropy(model(x_meta), y_meta)


def random_problem(n=10, d=6, c=5, k=2, m=8, seed=0):
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
