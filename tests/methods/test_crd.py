"""CRD: the two NCE terms against float64 loops over the drawn contrast indices, the sampler
(the example first, then distinct examples of other classes, uniformly), the normalising
constants set once, the momentum update of the memory banks, state saved and restored,
bf16 and autocast, DDP agreement, gradients into the student and the embeddings only."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from helpers.context import FakeContext, trainable_pair

from kdlab.errors import ConfigError
from kdlab.methods.base import Outputs
from kdlab.methods.crd import CRD
from kdlab.models import build_model
from kdlab.teachers import forward_with_features

P = "penultimate"
LABELS = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2])  # pools: 6 (class 0), 9, 9


def setup_crd(num_negatives=4, seed=0, labels=LABELS, **kwargs):
    """A CRD set up on a tiny MLP pair (penultimate widths 5 and 7) over 12 examples."""
    torch.manual_seed(seed)
    student = build_model("mlp", 3, (6,), hidden=[5])
    teacher = build_model("mlp", 3, (6,), hidden=[7]).eval()
    data = {"train": (torch.randn(len(labels), 6), labels)}
    ctx = FakeContext(student, (teacher,), num_classes=3, input_shape=(6,), data=data,
                      seed=seed)
    method = CRD(feat_dim=3, num_negatives=num_negatives, **kwargs)
    method.setup(ctx)
    method.on_fit_start(ctx)
    return method, ctx


def features(index, seed=1, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    n = len(index)
    student = Outputs(torch.randn(n, 3, generator=g).to(dtype),
                      {P: (torch.randn(n, 5, generator=g) * scale).to(dtype)})
    teacher = Outputs(torch.zeros(n, 3), {P: torch.randn(n, 7, generator=g) * scale})
    return student, [teacher], {"index": index, "target": LABELS[index]}


# -- an independent float64 implementation ----------------------------------------------------
def ref_embed(head, h):
    w, b = head.weight.double().tolist(), head.bias.double().tolist()
    out = []
    for row in h.double().tolist():
        v = [sum(wi * x for wi, x in zip(wr, row, strict=True)) + bi
             for wr, bi in zip(w, b, strict=True)]
        norm = math.sqrt(sum(x * x for x in v))
        out.append([x / norm for x in v])
    return out


def ref_scores(memory, anchors, contrast, tau):
    memory = memory.double().tolist()
    return [[math.exp(sum(m * a for m, a in zip(memory[j], anchor, strict=True)) / tau)
             for j in row] for anchor, row in zip(anchors, contrast.tolist(), strict=True)]


def ref_nce(scores, z, n_data):
    k = len(scores[0]) - 1
    noise = k / n_data
    total = 0.0
    for row in scores:
        p = [s / z for s in row]
        total += math.log(p[0] / (p[0] + noise + 1e-7))
        total += sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
    return -total / len(scores)


def draw(method, index, seed):
    method.reseed(seed)
    return method.contrast_indices(index)


@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_loss_matches_the_formula_and_z_is_set_once(tau):
    method, _ = setup_crd(nce_temperature=tau, weight=0.8, ce_weight=0.5)
    index = torch.tensor([0, 3, 7, 10])
    student, teachers, batch = features(index)
    m_s, m_t = method.memory_student.clone(), method.memory_teacher.clone()
    method.reseed(11)
    terms = method.loss_terms(student, teachers, batch)
    contrast = draw(method, index, 11)  # the same draw
    v_s = ref_embed(method.embed_student, student.features[P])
    v_t = ref_embed(method.embed_teacher, teachers[0].features[P])
    scores_s, scores_t = ref_scores(m_t, v_s, contrast, tau), ref_scores(m_s, v_t, contrast, tau)
    z_s = sum(map(sum, scores_s)) / (4 * 5) * 12  # mean of the first scores x N
    z_t = sum(map(sum, scores_t)) / (4 * 5) * 12
    assert method.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-4)
    expected = ref_nce(scores_s, z_s, 12) + ref_nce(scores_t, z_t, 12)
    assert terms["crd"].item() == pytest.approx(0.8 * expected, rel=1e-4)
    z = student.logits.double()
    ce = (torch.logsumexp(z, 1) - z[range(4), batch["target"]]).mean().item()
    assert terms["ce"].item() == pytest.approx(0.5 * ce, rel=1e-5)

    # a second step keeps Z
    index2 = torch.tensor([1, 2, 9])
    student2, teachers2, batch2 = features(index2, seed=2)
    method.reseed(12)
    terms2 = method.loss_terms(student2, teachers2, batch2)
    contrast2 = draw(method, index2, 12)
    v_s2 = ref_embed(method.embed_student, student2.features[P])
    v_t2 = ref_embed(method.embed_teacher, teachers2[0].features[P])
    expected2 = (ref_nce(ref_scores(m_t, v_s2, contrast2, tau), z_s, 12)
                 + ref_nce(ref_scores(m_s, v_t2, contrast2, tau), z_t, 12))
    assert method.normalizers.tolist() == pytest.approx([z_s, z_t], rel=1e-4)
    assert terms2["crd"].item() == pytest.approx(0.8 * expected2, rel=1e-4)


def test_contrast_indices_are_the_example_then_distinct_other_class_examples():
    method, _ = setup_crd(num_negatives=16384)  # capped at the smallest pool: 6
    index = torch.tensor([0, 4, 6, 11])
    contrast = draw(method, index, 0)
    assert contrast.shape == (4, 7)
    assert contrast[:, 0].tolist() == index.tolist()
    for row in contrast.tolist():
        anchor, negatives = row[0], row[1:]
        assert len(set(negatives)) == 6
        assert all(LABELS[j] != LABELS[anchor] for j in negatives)
    # class 0 has exactly 6 examples of other classes: all of them
    assert set(contrast[0, 1:].tolist()) == set(range(6, 12))


def test_negatives_are_uniform_over_the_other_classes():
    method, _ = setup_crd(num_negatives=3)
    method.reseed(0)
    counts = Counter()
    for _ in range(1500):
        counts.update(method.contrast_indices(torch.tensor([7]))[0, 1:].tolist())
    eligible = [0, 1, 2, 3, 4, 5, 9, 10, 11]  # every example not of class 1
    assert set(counts) == set(eligible)
    for j in eligible:  # each is drawn with probability 3 / 9
        assert counts[j] / 1500 == pytest.approx(1 / 3, abs=0.05)


def test_one_class_batch_and_a_one_class_train_split():
    method, _ = setup_crd()
    index = torch.tensor([0, 1, 2])  # all of class 0
    student, teachers, batch = features(index)
    m_s, m_t = method.memory_student.clone(), method.memory_teacher.clone()
    method.reseed(5)
    terms = method.loss_terms(student, teachers, batch)
    contrast = draw(method, index, 5)  # the same draw: negatives from the other classes
    tau = method.nce_temperature
    scores_s = ref_scores(m_t, ref_embed(method.embed_student, student.features[P]), contrast,
                          tau)
    scores_t = ref_scores(m_s, ref_embed(method.embed_teacher, teachers[0].features[P]),
                          contrast, tau)
    cells = len(index) * contrast.shape[1]
    z_s, z_t = (sum(map(sum, sc)) / cells * 12 for sc in (scores_s, scores_t))
    expected = ref_nce(scores_s, z_s, 12) + ref_nce(scores_t, z_t, 12)
    assert terms["crd"].item() == pytest.approx(method.weight * expected, rel=1e-4)
    with pytest.raises(ConfigError, match="at least two classes"):
        setup_crd(labels=torch.zeros(12, dtype=torch.long))


def test_momentum_update_of_the_memory_banks():
    method, ctx = setup_crd(momentum=0.5)
    index = torch.tensor([2, 8])
    student, teachers, batch = features(index)
    before_s, before_t = method.memory_student.clone(), method.memory_teacher.clone()
    method.loss_terms(student, teachers, batch)
    method.on_train_batch_end(ctx, batch)
    v_s = ref_embed(method.embed_student, student.features[P])
    v_t = ref_embed(method.embed_teacher, teachers[0].features[P])
    for bank, before, v in ((method.memory_student, before_s, v_s),
                            (method.memory_teacher, before_t, v_t)):
        for row, i in enumerate(index.tolist()):
            moved = [0.5 * a + 0.5 * b for a, b in zip(before[i].tolist(), v[row], strict=True)]
            norm = math.sqrt(sum(x * x for x in moved))
            assert bank[i].tolist() == pytest.approx([x / norm for x in moved], rel=1e-5)
        untouched = [i for i in range(12) if i not in index.tolist()]
        assert torch.equal(bank[untouched], before[untouched])


def test_banks_start_from_the_run_seed_within_the_authors_range():
    a, _ = setup_crd(seed=3)
    b, _ = setup_crd(seed=3)
    c, _ = setup_crd(seed=4)
    assert torch.equal(a.memory_student, b.memory_student)  # every DDP rank starts alike
    assert not torch.equal(a.memory_student, c.memory_student)
    bound = 1 / math.sqrt(3 / 3)
    assert a.memory_teacher.abs().max() <= bound and a.memory_student.shape == (12, 3)
    assert int((a.normalizers < 0).sum()) == 2  # Z not set before the first step


def test_state_is_saved_and_restored():
    method, ctx = setup_crd()
    index = torch.tensor([0, 6, 9])
    student, teachers, batch = features(index)
    method.loss_terms(student, teachers, batch)
    method.on_train_batch_end(ctx, batch)
    state = method.state_dict()
    assert {"memory_student", "memory_teacher", "normalizers", "embed_student.weight",
            "embed_teacher.bias"} <= set(state)
    assert "train_labels" not in state  # read from the data at every fit start
    fresh = CRD(feat_dim=3, num_negatives=4)
    fresh.load_state_dict(state)  # before setup: embeddings and banks sized from the state
    fresh.on_fit_start(ctx)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    student2, teachers2, batch2 = features(torch.tensor([1, 10]), seed=5)
    method.reseed(9)
    a = method.loss_terms(student2, teachers2, batch2)["crd"]
    fresh.reseed(9)
    b = fresh.loss_terms(student2, teachers2, batch2)["crd"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_ddp_ranks_agree_on_z():
    """The first step's Z is averaged over the ranks (here a second rank with 3x the value)."""
    method, ctx = setup_crd()
    index = torch.tensor([0, 7])
    student, teachers, batch = features(index)
    method.loss_terms(student, teachers, batch)
    z = method.normalizers.clone()
    method._pending = None  # only the Z exchange here
    ctx.world_size = 2
    ctx.all_gather = lambda t: torch.stack([t, 3 * t])
    method.on_train_batch_end(ctx, batch)
    assert method.normalizers.tolist() == pytest.approx((2 * z).tolist())


def test_bf16_features_and_autocast_are_computed_in_float32():
    method, _ = setup_crd()
    index = torch.tensor([0, 5, 8])
    ref_student, teachers, batch = features(index)
    method.reseed(3)
    reference = method.loss_terms(ref_student, teachers, batch)["crd"].item()
    method.normalizers.fill_(-1.0)
    method._z_ready = False
    bf16_student, _, _ = features(index, dtype=torch.bfloat16)
    as_float = Outputs(bf16_student.logits.float(), {P: bf16_student.features[P].float()})
    method.reseed(3)
    rounded = method.loss_terms(as_float, teachers, batch)["crd"].item()
    method.normalizers.fill_(-1.0)
    method._z_ready = False
    method.reseed(3)
    terms = method.loss_terms(bf16_student, teachers, batch)
    assert terms["crd"].dtype == torch.float32
    assert terms["crd"].item() == pytest.approx(rounded, rel=1e-6)
    method.normalizers.fill_(-1.0)
    method._z_ready = False
    method.reseed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = method.loss_terms(ref_student, teachers, batch)["crd"].item()
    assert auto == pytest.approx(reference, rel=1e-5)


def test_very_large_teacher_features():
    """A teacher with huge activations: the embedding normalises them, the loss stays exact."""
    method, _ = setup_crd(nce_temperature=0.07)
    index = torch.tensor([0, 7, 11])
    student, teachers, batch = features(index, scale=1e4)
    m_s, m_t = method.memory_student.clone(), method.memory_teacher.clone()
    method.reseed(4)
    terms = method.loss_terms(student, teachers, batch)
    contrast = draw(method, index, 4)
    v_s = ref_embed(method.embed_student, student.features[P])
    v_t = ref_embed(method.embed_teacher, teachers[0].features[P])
    scores_s, scores_t = ref_scores(m_t, v_s, contrast, 0.07), ref_scores(m_s, v_t, contrast, 0.07)
    z_s, z_t = (sum(map(sum, sc)) / (3 * 5) * 12 for sc in (scores_s, scores_t))
    expected = ref_nce(scores_s, z_s, 12) + ref_nce(scores_t, z_t, 12)
    assert terms["crd"].item() == pytest.approx(0.8 * expected, rel=1e-4)


def test_gradients_reach_student_and_embeddings_never_teacher_or_banks():
    student, teacher = trainable_pair()
    labels = torch.arange(16) % 10
    ctx = FakeContext(student, (teacher,), data={"train": (torch.randn(16, 1, 8, 8), labels)})
    method = CRD(num_negatives=8)
    method.setup(ctx)
    method.setup(ctx)  # idempotent
    method.on_fit_start(ctx)
    index = torch.tensor([0, 3, 5, 9])
    x = ctx.data["train"][0][index]
    terms = method(forward_with_features(student, x, method.student_features),
                   ctx.teacher_outputs(x, method.teacher_features),
                   {"index": index, "target": labels[index]})
    terms["crd"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for p in method.extra_parameters()} == {
        id(p) for p in [*method.embed_student.parameters(), *method.embed_teacher.parameters()]}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.extra_parameters())
    assert student.features[0].weight.grad.abs().sum() > 0
    assert not method.memory_student.requires_grad and method.memory_student.grad is None


def test_negatives_are_a_function_of_seed_epoch_and_rank():
    """Drawn from the method's own generator, reseeded at each epoch start: a resumed run
    draws the negatives the uninterrupted one drew, whatever the global RNG did."""
    a, ctx = setup_crd(num_negatives=3)
    b, _ = setup_crd(num_negatives=3)
    index = torch.tensor([0, 7, 10])
    a.on_train_epoch_start(ctx)
    torch.manual_seed(123)  # the global RNG plays no part
    first = a.contrast_indices(index)
    b.on_train_epoch_start(ctx)
    assert torch.equal(b.contrast_indices(index), first)
    ctx.current_epoch = 1
    b.on_train_epoch_start(ctx)
    assert not torch.equal(b.contrast_indices(index), first)
