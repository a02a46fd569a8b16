"""ND (KD++ / DKD++): the class means computed once from the train split, the ND term and the
KD / DKD terms against float64 loops, the warm-up, the projector, state saved and restored
(and kept on resume), DDP agreement, bf16, gradients into the student and projector only."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.context import FakeContext, trainable_pair
from loss_cases import make_inputs

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.nd import ND
from kdlab.models import build_model
from kdlab.teachers import forward_with_features

P = "penultimate"


def log_softmax(row, temperature=1.0):
    z = [v / temperature for v in row]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def ref_kl(p_log, q_log):
    return sum(math.exp(a) * (a - b) for a, b in zip(p_log, q_log, strict=True))


def ref_kd(s, t, temperature):
    return sum(ref_kl(log_softmax(tr, temperature), log_softmax(sr, temperature))
               for sr, tr in zip(s, t, strict=True)) / len(s) * temperature**2


def ref_dkd(s, t, y, temperature):
    """(TCKD, NCKD) from explicit probability masses."""
    tckd = nckd = 0.0
    for sr, tr, label in zip(s, t, y, strict=True):
        ps = [math.exp(v) for v in log_softmax(sr, temperature)]
        pt = [math.exp(v) for v in log_softmax(tr, temperature)]
        tckd += sum(a * math.log(a / b) for a, b in zip([pt[label], 1 - pt[label]],
                                                        [ps[label], 1 - ps[label]], strict=True))
        others = [c for c in range(len(sr)) if c != label]
        qs = [ps[c] / (1 - ps[label]) for c in others]
        qt = [pt[c] / (1 - pt[label]) for c in others]
        nckd += sum(a * math.log(a / b) for a, b in zip(qt, qs, strict=True))
    return tckd / len(y) * temperature**2, nckd / len(y) * temperature**2


def ref_nd(h_s, h_t, means, y):
    total = 0.0
    for hs, ht, label in zip(h_s, h_t, y, strict=True):
        mu = means[label]
        e = [v / math.sqrt(sum(x * x for x in mu)) for v in mu]
        largest = max(math.sqrt(sum(x * x for x in hs)), math.sqrt(sum(x * x for x in ht)))
        total += 1 - sum(a * b for a, b in zip(hs, e, strict=True)) / largest
    return total / len(y)


def ref_ce(s, y):
    return sum(-log_softmax(row)[label] for row, label in zip(s, y, strict=True)) / len(y)


def ready(method, means):
    """A method with given class means (as on_fit_start would leave it)."""
    method.class_means = means.clone()
    method.has_class_means.fill_(True)
    return method


def inputs(classes=10, gap=0.0, seed=0, dim=6, dtype=torch.float32):
    s, t, y = make_inputs(classes, 2.0, gap, batch=5, seed=seed, teacher_offset=1)
    g = torch.Generator().manual_seed(seed + 100)
    h_s, h_t = torch.randn(5, dim, generator=g), torch.randn(5, dim, generator=g)
    means = torch.randn(classes, dim, generator=g)
    student = Outputs(s.to(dtype), {P: h_s.to(dtype)})
    return student, [Outputs(t, {P: h_t})], {"target": y}, means


@pytest.mark.parametrize("gap", [0.0, 40.0], ids=["random", "very confident teacher"])
def test_kd_plus_plus_matches_the_formula(gap):
    student, teachers, batch, means = inputs(gap=gap)
    method = ready(ND(base="kd", temperature=4.0, ce_weight=1.0, kd_weight=3.5, nd_weight=2.0,
                      warmup_epochs=20), means)
    method.epoch.fill_(5)  # warm-up 5 / 20
    terms = method.loss_terms(student, teachers, batch)
    assert set(terms) == {"ce", "kd", "nd"}
    s, t = student.logits.double().tolist(), teachers[0].logits.double().tolist()
    y = batch["target"].tolist()
    assert terms["kd"].item() == pytest.approx(0.25 * 3.5 * ref_kd(s, t, 4.0), rel=1e-4, abs=1e-6)
    nd = ref_nd(student.features[P].double().tolist(), teachers[0].features[P].double().tolist(),
                means.double().tolist(), y)
    assert terms["nd"].item() == pytest.approx(2.0 * nd, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ref_ce(s, y), rel=1e-5)


def test_dkd_plus_plus_matches_the_formula():
    student, teachers, batch, means = inputs(seed=3)
    method = ready(ND(base="dkd", temperature=4.0, alpha=2.0, beta=8.0, nd_weight=0.5), means)
    method.epoch.fill_(30)  # past the warm-up
    terms = method.loss_terms(student, teachers, batch)
    assert set(terms) == {"ce", "tckd", "nckd", "nd"}
    s, t = student.logits.double().tolist(), teachers[0].logits.double().tolist()
    y = batch["target"].tolist()
    tckd, nckd = ref_dkd(s, t, y, 4.0)
    assert terms["tckd"].item() == pytest.approx(2.0 * tckd, rel=1e-4, abs=1e-6)
    assert terms["nckd"].item() == pytest.approx(8.0 * nckd, rel=1e-4, abs=1e-6)
    nd = ref_nd(student.features[P].double().tolist(), teachers[0].features[P].double().tolist(),
                means.double().tolist(), y)
    assert terms["nd"].item() == pytest.approx(0.5 * nd, rel=1e-5)


def test_first_epoch_has_no_kd_term_and_the_warmup_is_state():
    student, teachers, batch, means = inputs()
    method = ready(ND(warmup_epochs=20), means)
    for current_epoch, factor in [(0, 0.0), (10, 0.5), (25, 1.0)]:
        method.on_train_epoch_start(FakeContext(torch.nn.Identity(), current_epoch=current_epoch))
        assert method.warmup_factor().item() == pytest.approx(factor)
    method.on_train_epoch_start(FakeContext(torch.nn.Identity(), current_epoch=0))
    assert method.loss_terms(student, teachers, batch)["kd"].item() == 0.0


def test_one_class_in_the_batch_and_bf16():
    student, teachers, batch, means = inputs(dtype=torch.bfloat16)
    batch = {"target": torch.full((5,), 4)}
    method = ready(ND(), means)
    method.epoch.fill_(20)
    terms = method.loss_terms(student, teachers, batch)
    assert all(v.dtype == torch.float32 for v in terms.values())
    h_s = student.features[P].double().tolist()
    nd = ref_nd(h_s, teachers[0].features[P].double().tolist(), means.double().tolist(), [4] * 5)
    assert terms["nd"].item() == pytest.approx(2.0 * nd, rel=1e-5)
    kd = ref_kd(student.logits.double().tolist(), teachers[0].logits.double().tolist(), 4.0)
    assert terms["kd"].item() == pytest.approx(3.5 * kd, rel=1e-4)


def mlp_pair(student_hidden=5, teacher_hidden=5, seed=0, n=20, classes=3):
    torch.manual_seed(seed)
    student = build_model("mlp", classes, (4,), hidden=[student_hidden])
    teacher = build_model("mlp", classes, (4,), hidden=[teacher_hidden]).eval()
    data = {"train": (torch.randn(n, 4), torch.arange(n) % classes)}
    return student, teacher, data


def test_class_means_are_the_teachers_mean_embedding_per_class_computed_once():
    student, teacher, data = mlp_pair()
    ctx = FakeContext(student, (teacher,), num_classes=3, input_shape=(4,), data=data)
    method = ND(batch_size=7)  # three batches of the train split
    method.setup(ctx)
    method.on_fit_start(ctx)
    with torch.no_grad():
        h = torch.relu(teacher.body[1](data["train"][0])).double().tolist()
    labels = data["train"][1].tolist()
    for c in range(3):
        rows = [h[i] for i in range(20) if labels[i] == c]
        mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
        assert method.class_means[c].tolist() == pytest.approx(mean, rel=1e-5, abs=1e-6)
    saved = method.class_means.clone()
    other = {"train": (torch.randn(20, 4), torch.arange(20) % 3)}
    method.on_fit_start(FakeContext(student, (teacher,), num_classes=3, input_shape=(4,),
                                    data=other))  # a resumed fit: the means are kept
    assert torch.equal(method.class_means, saved)
    # every DDP rank computes them from the whole split: the same means on each
    rank1 = ND(batch_size=7)
    ctx1 = FakeContext(student, (teacher,), num_classes=3, input_shape=(4,), data=data,
                       global_rank=1, world_size=2)
    rank1.setup(ctx1)
    rank1.on_fit_start(ctx1)
    assert torch.equal(rank1.class_means, saved)


def test_state_saved_and_restored_with_the_projector():
    student, teacher, data = mlp_pair(student_hidden=5, teacher_hidden=8)
    ctx = FakeContext(student, (teacher,), num_classes=3, input_shape=(4,), data=data)
    method = ND()
    method.setup(ctx)
    assert isinstance(method.projector[0], torch.nn.BatchNorm1d)
    assert isinstance(method.projector[1], torch.nn.Dropout) and method.projector[1].p == 0.5
    assert (method.projector[2].in_features, method.projector[2].out_features) == (5, 8)
    method.on_fit_start(ctx)
    method.epoch.fill_(7)
    state = method.state_dict()
    assert {"class_means", "has_class_means", "epoch", "projector.2.weight"} <= set(state)
    fresh = ND()
    fresh.load_state_dict(state)  # before setup: projector and means from the checkpoint
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    fresh.setup(ctx)  # keeps what was loaded
    assert torch.equal(fresh.class_means, method.class_means) and bool(fresh.has_class_means)
    method.eval()
    fresh.eval()
    x = data["train"][0][:6]
    batch = {"target": data["train"][1][:6]}
    outs = forward_with_features(student, x, (P,))
    teachers = ctx.teacher_outputs(x, (P,))
    a, b = method.loss_terms(outs, teachers, batch), fresh.loss_terms(outs, teachers, batch)
    assert all(a[k].item() == pytest.approx(b[k].item(), rel=1e-6) for k in a)


def test_nd_uses_the_projected_student_embedding():
    student, teacher, data = mlp_pair(student_hidden=5, teacher_hidden=8)
    ctx = FakeContext(student, (teacher,), num_classes=3, input_shape=(4,), data=data)
    method = ND()
    method.setup(ctx)
    method.on_fit_start(ctx)
    method.eval()  # dropout off, BN on its running statistics (mean 0, variance 1)
    x, y = data["train"][0][:5], data["train"][1][:5]
    outs = forward_with_features(student, x, (P,))
    teachers = ctx.teacher_outputs(x, (P,))
    terms = method.loss_terms(outs, teachers, {"target": y})
    lin, bn = method.projector[2], method.projector[0]
    h = outs.features[P].double()
    h = (h / math.sqrt(1 + bn.eps)) * bn.weight.double() + bn.bias.double()
    projected = (h @ lin.weight.double().T + lin.bias.double()).tolist()
    nd = ref_nd(projected, teachers[0].features[P].double().tolist(),
                method.class_means.double().tolist(), y.tolist())
    assert terms["nd"].item() == pytest.approx(2.0 * nd, rel=1e-5)


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="method.base must be one of kd, dkd"):
        ND(base="fitnet")
    student, teacher, data = mlp_pair(student_hidden=5, teacher_hidden=8)
    ctx = FakeContext(student, (teacher,), num_classes=3, input_shape=(4,), data=data)
    with pytest.raises(ConfigError, match="projector=never needs equal penultimate widths"):
        ND(projector="never").setup(ctx)
    with pytest.raises(RuntimeError, match="on_fit_start"):
        method = ND()
        method.setup(ctx)
        method.loss_terms(Outputs(torch.zeros(2, 3), {P: torch.zeros(2, 5)}),
                          [Outputs(torch.zeros(2, 3), {P: torch.zeros(2, 8)})],
                          {"target": torch.tensor([0, 1])})


def test_gradients_reach_student_and_projector_never_the_teacher():
    student, teacher = trainable_pair()
    data = {"train": (torch.randn(12, 1, 8, 8), torch.arange(12) % 10)}
    ctx = FakeContext(student, (teacher,), data=data)
    method = ND(warmup_epochs=0)
    method.setup(ctx)
    method.on_fit_start(ctx)
    x = data["train"][0][:4]
    terms = method(forward_with_features(student, x, method.student_features),
                   ctx.teacher_outputs(x, method.teacher_features),
                   {"target": data["train"][1][:4]})
    sum(terms.values()).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in method.extra_parameters()} == {
        id(p) for p in method.projector.parameters()}
    assert all(p.grad is not None for p in method.extra_parameters())
    assert student.features[0].weight.grad.abs().sum() > 0


def test_projector_dropout_masks_are_a_function_of_seed_epoch_and_rank():
    """A resumed run must draw the masks the uninterrupted one drew: they come from a
    generator reseeded at each epoch start, not from the global RNG."""
    student, teacher, data = mlp_pair(student_hidden=5, teacher_hidden=8)
    ctx = FakeContext(student, (teacher,), num_classes=3, input_shape=(4,), data=data,
                      current_epoch=3)
    a, b = ND(), ND()
    for method in (a, b):
        method.setup(ctx)
    b.load_state_dict(a.state_dict(), strict=False)
    h = torch.randn(6, 5)
    a.on_train_epoch_start(ctx)
    torch.manual_seed(1)
    out_a = a.projector(h)
    b.on_train_epoch_start(ctx)
    torch.manual_seed(2)  # the global RNG plays no part
    assert torch.equal(b.projector(h), out_a)
    kept = (a.projector[1](torch.ones(1000, 5)) != 0).float().mean().item()
    assert kept == pytest.approx(0.5, abs=0.03)
