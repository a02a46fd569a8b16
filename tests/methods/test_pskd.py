"""PS-KD: targets from the stored memory, the read-before-write epoch semantics, the memory
as module state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.context import FakeContext

from kdlab.methods.base import Outputs
from kdlab.methods.pskd import PSKD

N, C, EPOCHS = 8, 3, 4


def make_ctx(epoch=0, train_size=N, classes=C, max_epochs=EPOCHS):
    data = {"train": (torch.zeros(train_size, 1), torch.zeros(train_size, dtype=torch.long))}
    return FakeContext(student=torch.nn.Identity(), num_classes=classes, data=data,
                       max_epochs=max_epochs, current_epoch=epoch)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def ref_soft_ce(s, q):
    return np.mean([-np.sum(q[i] * np.log(np_softmax(s[i]))) for i in range(len(s))])


def step(method, logits, target, index, epoch):
    """One training step as DistillModule runs it: loss, (optimiser), batch-end hook."""
    batch = {"target": target, "index": index}
    terms = method.loss_terms(Outputs(logits), [], batch)
    method.on_train_batch_end(make_ctx(epoch), batch)
    return terms


def test_first_epoch_targets_are_one_hot():
    method = PSKD()
    method.setup(make_ctx())
    method.on_train_epoch_start(make_ctx(epoch=0))
    assert float(method.alpha) == pytest.approx(0.8 * 1 / EPOCHS)
    g = torch.Generator().manual_seed(0)
    s, y = torch.randn(4, C, generator=g) * 3, torch.tensor([0, 2, 1, 2])
    terms = step(method, s, y, torch.tensor([5, 1, 0, 7]), epoch=0)
    assert set(terms) == {"soft_ce"}
    expected = ref_soft_ce(s.double().numpy(), np.eye(C)[y.numpy()])
    assert terms["soft_ce"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gap", [0.0, 40.0], ids=["random", "dominant class"])
def test_targets_mix_label_and_last_epoch_prediction(gap):
    method = PSKD(alpha_T=0.8)
    method.setup(make_ctx())
    g = torch.Generator().manual_seed(1)
    y_all = torch.randint(0, C, (N,), generator=g)
    # epoch 0: the whole train set but example 3 (as drop_last would leave one out)
    seen = torch.tensor([0, 1, 2, 4, 5, 6, 7])
    s0 = torch.randn(N, C, generator=g) * 2
    s0[torch.arange(N), y_all] += gap
    method.on_train_epoch_start(make_ctx(epoch=0))
    for idx in (seen[:4], seen[4:]):
        step(method, s0[idx], y_all[idx], idx, epoch=0)
    stored = {int(i): np_softmax(s0[i].double().numpy()) for i in seen}

    method.on_train_epoch_start(make_ctx(epoch=1))
    a = 0.8 * 2 / EPOCHS
    assert float(method.alpha) == pytest.approx(a)
    idx = torch.tensor([3, 6, 0, 2])
    s1 = torch.randn(4, C, generator=g)
    before = method.memory.clone()
    terms = method.loss_terms(Outputs(s1), [], {"target": y_all[idx], "index": idx})
    assert torch.equal(method.memory, before)  # nothing is written before the step ends
    q = []
    for i in idx.tolist():
        onehot = np.eye(C)[int(y_all[i])]
        q.append(onehot if i not in stored else (1 - a) * onehot + a * stored[i])
    expected = ref_soft_ce(s1.double().numpy(), np.array(q))
    assert terms["soft_ce"].item() == pytest.approx(expected, rel=1e-5)

    # after the step: this epoch's predictions replace the stored ones for these rows only
    method.on_train_batch_end(make_ctx(epoch=1), {"index": idx})
    for row, i in enumerate(idx.tolist()):
        np.testing.assert_allclose(method.memory[i].numpy(), np_softmax(s1[row].numpy()),
                                   rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(method.memory[1].numpy(), stored[1], rtol=1e-5, atol=1e-7)
    assert method.has_memory.tolist() == [True] * N


def test_target_uses_previous_epoch_even_after_memory_update():
    """Reading the same example twice in one epoch is impossible in training, but the rule
    is: the target is built before the row is overwritten with the current prediction."""
    method = PSKD()
    method.setup(make_ctx())
    idx, y = torch.tensor([2]), torch.tensor([1])
    method.on_train_epoch_start(make_ctx(epoch=0))
    step(method, torch.tensor([[4.0, 0.0, 0.0]]), y, idx, epoch=0)
    method.on_train_epoch_start(make_ctx(epoch=3))
    q = method.targets(y, idx)
    prev = np_softmax([4.0, 0.0, 0.0])
    expected = 0.2 * np.eye(C)[1] + 0.8 * prev
    np.testing.assert_allclose(q[0].numpy(), expected, rtol=1e-5)


def test_gradient_reaches_student_logits():
    method = PSKD()
    method.setup(make_ctx())
    s = torch.randn(3, C, requires_grad=True)
    method.loss_terms(Outputs(s), [], {"target": torch.tensor([0, 1, 2]),
                                       "index": torch.tensor([0, 1, 2])})["soft_ce"].backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert not method.memory.requires_grad


def test_setup_is_idempotent_and_memory_is_state():
    method = PSKD()
    method.setup(make_ctx())
    method.memory[2] = torch.tensor([0.1, 0.2, 0.7])
    method.has_memory[2] = True
    method.setup(make_ctx())  # e.g. the test stage after fit
    assert method.memory[2].tolist() == pytest.approx([0.1, 0.2, 0.7])
    state = method.state_dict()
    assert {"memory", "has_memory", "alpha"} <= set(state)
    fresh = PSKD()  # not set up: loading resizes the memory
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory, method.memory)
    assert torch.equal(fresh.has_memory, method.has_memory)


def test_explicit_max_epochs_and_missing_setup():
    method = PSKD(max_epochs=10)
    method.on_train_epoch_start(make_ctx(epoch=4, max_epochs=99))
    assert float(method.alpha) == pytest.approx(0.8 * 5 / 10)
    with pytest.raises(RuntimeError, match="setup"):
        method.targets(torch.tensor([0]), torch.tensor([0]))
