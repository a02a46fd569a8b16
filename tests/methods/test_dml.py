"""Deep mutual learning: the four terms against float64 numpy, each network's gradient coming
only from its own terms, the peer (built from its config, its own seed, tested like the
student in results.json)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from helpers.runs import FAST
from loss_cases import CASES, make_inputs
from torch import nn

from kdlab.config import compose
from kdlab.errors import ConfigError
from kdlab.methods import instantiate_method
from kdlab.methods.base import Outputs
from kdlab.methods.dml import DML
from kdlab.models import build_model


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    m = z.max()
    return z - m - np.log(np.exp(z - m).sum())


def ref_ce(z, y):
    return np.mean([-np_log_softmax(z[i])[y[i]] for i in range(len(y))])


def ref_kl(target_logits, logits, temperature):
    """T^2 mean_i KL(softmax(target / T) || softmax(logits / T))."""
    total = 0.0
    for i in range(len(logits)):
        log_q = np_log_softmax(target_logits[i] / temperature)
        log_p = np_log_softmax(logits[i] / temperature)
        total += sum(np.exp(log_q[c]) * (log_q[c] - log_p[c]) for c in range(len(log_p)))
    return temperature ** 2 * total / len(logits)


class FixedPeer(nn.Module):
    """A "peer" whose output is given (to test the loss on chosen logits)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())

    def forward(self, x):
        return self.logits * 1.0


def with_peer(method, peer_logits):
    method.peer = FixedPeer(peer_logits)
    return method


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_terms_match_formula(case):
    _, classes, scale, temperature, gap = case
    s, q, y = make_inputs(classes, scale, gap, teacher_offset=1)
    method = with_peer(DML(ce_weight=0.5, kl_weight=2.0, temperature=temperature), q)
    terms = method.loss_terms(Outputs(s), [], {"input": s, "target": y})
    assert set(terms) == {"ce", "kl", "peer_ce", "peer_kl"}
    sn, qn, yn = s.double().numpy(), q.double().numpy(), y.numpy()
    expected = {"ce": 0.5 * ref_ce(sn, yn), "kl": 2.0 * ref_kl(qn, sn, temperature),
                "peer_ce": 0.5 * ref_ce(qn, yn), "peer_kl": 2.0 * ref_kl(sn, qn, temperature)}
    for k, v in expected.items():
        assert terms[k].item() == pytest.approx(v, rel=1e-4, abs=1e-6), k


@pytest.mark.parametrize("edge", ["bf16", "one class", "confident peer"])
def test_edge_cases(edge):
    s, q, y = make_inputs(10, 3.0, 40.0 if edge == "confident peer" else 0.0,
                          student_gap=False, teacher_offset=1)
    if edge == "one class":
        y = torch.full_like(y, 7)
    if edge == "bf16":
        s, q = s.bfloat16(), q.bfloat16()
    method = with_peer(DML(), q)
    terms = method.loss_terms(Outputs(s), [], {"input": s, "target": y})
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    sn, qn = s.double().numpy(), q.double().numpy()
    assert terms["kl"].item() == pytest.approx(ref_kl(qn, sn, 1.0), rel=1e-4, abs=1e-5)
    assert terms["peer_kl"].item() == pytest.approx(ref_kl(sn, qn, 1.0), rel=1e-4, abs=1e-5)


def tiny_setup(method, seed=0):
    torch.manual_seed(seed)
    student = build_model("mlp", 10, (1, 8, 8), hidden=[16])
    ctx = FakeContext(student, seed=seed)
    method.setup(ctx)
    return student, ctx


def test_each_network_learns_only_from_its_own_terms():
    method = DML(peer={"_target_": "kdlab.models.small.mlp", "hidden": [12]})
    student, _ = tiny_setup(method)
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    terms = method.loss_terms(Outputs(student(x)), [], {"input": x, "target": y})
    s_params, p_params = list(student.parameters()), list(method.peer.parameters())
    for names, reaches, never in ((("ce", "kl"), s_params, p_params),
                                  (("peer_ce", "peer_kl"), p_params, s_params)):
        for name in names:
            grads = torch.autograd.grad(terms[name], reaches + never, retain_graph=True,
                                        allow_unused=True)
            assert all(g is not None for g in grads[:len(reaches)]), name
            assert all(g is None for g in grads[len(reaches):]), name


def test_the_peer_is_built_from_its_config_with_its_own_seed():
    cfg = compose(["method=dml", "student.width=4"])
    method = instantiate_method(cfg.method)
    assert method.peer_config == {"_target_": "kdlab.models.small.cnn", "width": 4}
    torch.manual_seed(0)
    student = build_model(dict(cfg.student), 10, (1, 8, 8))
    method.setup(FakeContext(student, seed=3))
    peer = method.peer
    assert [p.shape for p in peer.parameters()] == [p.shape for p in student.parameters()]
    assert not torch.equal(peer.classifier.weight, student.classifier.weight)
    method.setup(FakeContext(student, seed=3))  # idempotent
    assert method.peer is peer
    assert method.evaluated_models() == {"peer": peer}
    assert {id(p) for p in method.extra_parameters()} == {id(p) for p in peer.parameters()}
    again = instantiate_method(cfg.method)
    torch.manual_seed(123)  # the global RNG does not matter, the run seed does
    again.setup(FakeContext(student, seed=3))
    for a, b in zip(again.peer.parameters(), peer.parameters(), strict=True):
        assert torch.equal(a, b)
    other = instantiate_method(cfg.method)
    other.setup(FakeContext(student, seed=4))
    assert not torch.equal(other.peer.classifier.weight, peer.classifier.weight)


def test_peer_by_name_and_bad_peers():
    method = DML(peer="mlp_small")
    student, _ = tiny_setup(method)
    assert method.peer.body[1].out_features == 60
    with pytest.raises(ConfigError, match="unknown model"):
        DML(peer="no_such_net").check(student, [])
    with pytest.raises(ConfigError, match="_target_"):
        DML(peer={"width": 3})
    copy = DML(peer=None)
    tiny_setup(copy)
    assert type(copy.peer) is type(student)


def test_both_networks_are_tested_and_reported(tmp_path, monkeypatch):
    """A real run: results.json["peers"]["peer"] is the peer's test accuracy of the best
    checkpoint (recomputed here), and both networks learned."""
    from kdlab.data.digits import DigitsDataModule
    from kdlab.module import DistillModule
    from kdlab.pipeline import run

    monkeypatch.setenv("KDLAB_CACHE_DIR", str(tmp_path / "cache"))
    cfg = compose([*FAST, "method=dml", "student=mlp", "student.hidden=[32]",
                   "trainer.max_epochs=2"])
    results = run(cfg, tmp_path / "run")
    assert results["teachers"] == []
    path = results["checkpoints"]["best"]
    module = DistillModule.load_from_checkpoint(path)
    module.method.setup(FakeContext(module.student, seed=0))
    module.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    dm = DigitsDataModule(seed=0)
    dm.setup()
    test = dm.splits["test"]
    with torch.no_grad():
        acc = (module.method.peer.eval()(test.inputs).argmax(1) == test.targets).float().mean()
    assert results["peers"]["peer"]["acc"] == pytest.approx(float(acc), abs=1e-6)
    assert results["peers"]["peer"]["acc"] > 0.5 and results["test"]["acc"] > 0.5
    assert set(results["peers"]["peer"]) == set(results["test"])
