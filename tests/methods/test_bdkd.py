"""BD-KD: the per-example weights and both networks' balanced divergences against float64
numpy loops, for every weighting and both peer terms; the reduction to DML; gradients (each
network from its own terms only, none through the weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from loss_cases import CASES, make_inputs
from test_dml import FixedPeer, ref_ce, ref_kl

from kdlab.config import compose
from kdlab.errors import ConfigError
from kdlab.methods import instantiate_method
from kdlab.methods.base import Outputs
from kdlab.methods.bdkd import BDKD, reverse_weights
from kdlab.methods.dml import DML, log_probs


def np_probs(z, temperature):
    z = np.asarray(z, dtype=np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def np_kl(p, q):
    return sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0)


def np_entropy(p):
    return -sum(pi * np.log(pi) for pi in p if pi > 0)


def ref_weights(s, t, temperature, weighting, gap_scale=1.0, reverse_weight=0.5):
    out = []
    for i in range(len(s)):
        gap = np_entropy(np_probs(s[i], temperature)) - np_entropy(np_probs(t[i], temperature))
        out.append({"hard": float(gap > 0), "soft": 1 / (1 + np.exp(-gap / gap_scale)),
                    "constant": reverse_weight}[weighting])
    return np.array(out)


def ref_bdkd(s, t, y, temperature, weighting, peer_divergence, **kw):
    """(student divergence, peer divergence) of the docstring, T^2-scaled, batch means."""
    r = ref_weights(s, t, temperature, weighting, **kw)
    student = peer = 0.0
    for i in range(len(s)):
        ps, pt = np_probs(s[i], temperature), np_probs(t[i], temperature)
        mix = (1 - r[i]) * np_kl(pt, ps) + r[i] * np_kl(ps, pt)
        student += mix
        peer += mix if peer_divergence == "balanced" else np_kl(ps, pt)
    n = len(s)
    return temperature ** 2 * student / n, temperature ** 2 * peer / n


WEIGHTINGS = [("hard", {}), ("soft", {"gap_scale": 0.5}), ("constant", {"reverse_weight": 0.3})]


@pytest.mark.parametrize("weighting,kw", WEIGHTINGS, ids=[w[0] for w in WEIGHTINGS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_weights_match_the_entropy_gap(case, weighting, kw):
    _, classes, scale, temperature, gap = case
    s, t, _ = make_inputs(classes, scale, gap, teacher_offset=1)
    got = reverse_weights(log_probs(s, temperature), log_probs(t, temperature), weighting, **kw)
    np.testing.assert_allclose(got.double().numpy(),
                               ref_weights(s.double().numpy(), t.double().numpy(),
                                           temperature, weighting, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("peer_divergence", ["balanced", "reverse"])
@pytest.mark.parametrize("weighting,kw", WEIGHTINGS, ids=[w[0] for w in WEIGHTINGS])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_terms_match_formula(case, weighting, kw, peer_divergence):
    _, classes, scale, temperature, gap = case
    s, t, y = make_inputs(classes, scale, gap, teacher_offset=1)
    method = BDKD(ce_weight=0.5, kd_weight=2.0, temperature=temperature, weighting=weighting,
                  peer_divergence=peer_divergence, **kw)
    method.peer = FixedPeer(t)
    terms = method.loss_terms(Outputs(s), [], {"input": s, "target": y})
    assert set(terms) == {"ce", "kd", "peer_ce", "peer_kd"}
    sn, tn, yn = s.double().numpy(), t.double().numpy(), y.numpy()
    student, peer = ref_bdkd(sn, tn, yn, temperature, weighting, peer_divergence, **kw)
    assert terms["kd"].item() == pytest.approx(2.0 * student, rel=1e-4, abs=1e-6)
    assert terms["peer_kd"].item() == pytest.approx(2.0 * peer, rel=1e-4, abs=1e-6)
    assert terms["ce"].item() == pytest.approx(0.5 * ref_ce(sn, yn), rel=1e-5)
    assert terms["peer_ce"].item() == pytest.approx(0.5 * ref_ce(tn, yn), rel=1e-5)


def test_reduces_to_dml():
    s, t, y = make_inputs(10, 3.0, 0.0, teacher_offset=1)
    bd = BDKD(weighting="constant", reverse_weight=0.0, peer_divergence="reverse",
              temperature=2.0)
    dml = DML(temperature=2.0)
    bd.peer, dml.peer = FixedPeer(t), FixedPeer(t)
    a = bd.loss_terms(Outputs(s), [], {"input": s, "target": y})
    b = dml.loss_terms(Outputs(s), [], {"input": s, "target": y})
    for x, z in (("kd", "kl"), ("peer_kd", "peer_kl"), ("ce", "ce"), ("peer_ce", "peer_ce")):
        assert a[x].item() == pytest.approx(b[z].item(), rel=1e-6)
    assert b["kl"].item() == pytest.approx(ref_kl(t.double().numpy(), s.double().numpy(), 2.0),
                                           rel=1e-4)


@pytest.mark.parametrize("edge", ["bf16", "one class", "confident peer"])
def test_edge_cases(edge):
    s, t, y = make_inputs(10, 3.0, 40.0 if edge == "confident peer" else 0.0,
                          student_gap=False, teacher_offset=1)
    if edge == "one class":
        y = torch.full_like(y, 2)
    if edge == "bf16":
        s, t = s.bfloat16(), t.bfloat16()
    method = BDKD(weighting="soft")
    method.peer = FixedPeer(t)
    terms = method.loss_terms(Outputs(s), [], {"input": s, "target": y})
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    student, peer = ref_bdkd(s.double().numpy(), t.double().numpy(), y.numpy(), 1.0, "soft",
                             "balanced")
    assert terms["kd"].item() == pytest.approx(student, rel=1e-4, abs=1e-5)
    assert terms["peer_kd"].item() == pytest.approx(peer, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("peer_divergence", ["balanced", "reverse"])
def test_each_network_from_its_own_terms_and_none_through_the_weights(peer_divergence):
    s, t, y = make_inputs(10, 2.0, 0.0, teacher_offset=1)
    s.requires_grad_(True)
    method = BDKD(weighting="soft", peer_divergence=peer_divergence)
    method.peer = FixedPeer(t)
    q = method.peer.logits
    terms = method.loss_terms(Outputs(s), [], {"input": s, "target": y})
    for names, own, other in ((("ce", "kd"), s, q), (("peer_ce", "peer_kd"), q, s)):
        for name in names:
            g_own, g_other = torch.autograd.grad(terms[name], [own, other], retain_graph=True,
                                                 allow_unused=True)
            assert g_own is not None and g_own.abs().sum() > 0 and g_other is None, name
    # the weights are constants: the gradient is that of the mixture with r fixed
    r = reverse_weights(log_probs(s, 1.0), log_probs(t, 1.0), "soft").detach()
    log_s, log_t = log_probs(s, 1.0), log_probs(t, 1.0)
    fixed = ((1 - r) * (log_t.exp() * (log_t - log_s)).sum(-1)
             + r * (log_s.exp() * (log_s - log_t)).sum(-1)).mean()
    torch.testing.assert_close(torch.autograd.grad(terms["kd"], s)[0],
                               torch.autograd.grad(fixed, s)[0])


def test_defaults_and_options():
    cfg = compose(["method=bdkd"])
    method = instantiate_method(cfg.method)
    assert method.peer_config == "cnn"  # the run's teacher architecture (digits: cnn)
    assert (method.weighting, method.peer_divergence, method.temperature) == ("hard",
                                                                             "balanced", 1.0)
    assert instantiate_method(compose(["method=bdkd", "dataset=synthetic"]).method
                              ).peer_config == "mlp_large"
    assert instantiate_method(compose(["method=bdkd", "teacher=mlp"]).method
                              ).peer_config == "mlp"
    for bad in ({"weighting": "entropy"}, {"peer_divergence": "forward"},
                {"gap_scale": 0.0}, {"reverse_weight": 2.0}):
        with pytest.raises(ConfigError):
            BDKD(**bad)
