"""PS-KD: targets from the stored memory, the read-before-write epoch semantics, the memory
as module state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.context import FakeContext
from helpers.gloo import gloo_ranks

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


# -- how the memory is stored (store, precision) -------------------------------------------


def two_epochs(method, s0, s1, y, n=N, classes=C):
    """Epoch 0 stores the predictions from logits ``s0`` for every example; epoch 1's loss on
    logits ``s1`` reads them back."""
    method.setup(make_ctx(train_size=n, classes=classes))
    method.on_train_epoch_start(make_ctx(epoch=0))
    index = torch.arange(n)
    for part in index.split(3):
        batch = {"target": y[part], "index": part}
        method.loss_terms(Outputs(s0[part]), [], batch)
        method.on_train_batch_end(make_ctx(epoch=0), batch)
    method.on_train_epoch_start(make_ctx(epoch=1))
    return method.loss_terms(Outputs(s1), [], {"target": y, "index": index})["soft_ce"]


def test_default_store_is_the_paper_memory_bit_for_bit():
    """store=full, precision=float32 (the defaults): the same state and the same loss, bit for
    bit, as PS-KD before the store options (its code, restated here)."""
    g = torch.Generator().manual_seed(3)
    s0, s1 = torch.randn(N, C, generator=g) * 2, torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    method = PSKD()
    loss = two_epochs(method, s0, s1, y)
    state = method.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "memory": (torch.float32, (N, C)), "has_memory": (torch.bool, (N,)),
        "alpha": (torch.float32, ())}
    memory = torch.softmax(s0.float(), dim=-1)  # the earlier code: softmax rows, stored as is
    assert torch.equal(state["memory"], memory)
    a = method.alpha
    onehot = torch.nn.functional.one_hot(y, C).float()
    q = (1.0 - a) * onehot + a * memory
    expected = -(q * torch.log_softmax(s1.float(), dim=-1)).sum(-1).mean()
    assert torch.equal(loss, expected)


def stored_reference(s0, k, half):
    """numpy: the stored prediction of PS-KD's compact stores, from the formula: softmax,
    rounded to float16 when ``half``, top-k kept, 1 - their sum spread over the others."""
    rows = []
    for z in s0.double().numpy():
        p = np_softmax(z).astype(np.float32)
        p = p.astype(np.float16).astype(np.float64) if half else p.astype(np.float64)
        if k is None:
            rows.append(p)
            continue
        top = np.argsort(-p)[:k]
        row = np.full(len(p), (1.0 - p[top].sum()) / (len(p) - k))
        row[top] = p[top]
        rows.append(row)
    return np.array(rows)


@pytest.mark.parametrize("store, precision", [("full", "float16"), ("topk", "float32"),
                                              ("topk", "float16")])
def test_compact_store_loss_is_the_formula_on_the_stored_predictions(store, precision):
    n, c, k = 12, 7, 3
    g = torch.Generator().manual_seed(4)
    s0, s1 = torch.randn(n, c, generator=g) * 3, torch.randn(n, c, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    method = PSKD(store=store, precision=precision, top_k=k)
    loss = two_epochs(method, s0, s1, y, n=n, classes=c)
    stored = stored_reference(s0, k if store == "topk" else None, precision == "float16")
    a = 0.8 * 2 / EPOCHS
    q = (1 - a) * np.eye(c)[y.numpy()] + a * stored
    assert loss.item() == pytest.approx(ref_soft_ce(s1.double().numpy(), q), rel=1e-6)
    # the stored rows are what the reference kept (not the unrounded softmax)
    kept = method.stored_predictions(torch.arange(n)).double().numpy()
    np.testing.assert_allclose(kept, stored, rtol=0, atol=1e-7)
    if precision == "float16":
        exact = stored_reference(s0, k if store == "topk" else None, half=False)
        assert np.abs(kept - exact).max() > 1e-6  # the rounding is there, and was used


def test_topk_memory_holds_k_probabilities_and_their_classes():
    method = PSKD(store="topk", top_k=2, precision="float16")
    method.setup(make_ctx(train_size=4, classes=5))
    assert method.memory.dtype == torch.float16 and method.memory.shape == (4, 2)
    assert method.memory_classes.dtype == torch.int16 and method.memory_classes.shape == (4, 2)
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05]]))
    batch = {"target": torch.tensor([0]), "index": torch.tensor([2])}
    method.on_train_epoch_start(make_ctx(epoch=0))
    method.loss_terms(Outputs(logits), [], batch)
    method.on_train_batch_end(make_ctx(epoch=0), batch)
    assert method.memory_classes[2].tolist() == [1, 3]
    assert method.memory[2].tolist() == pytest.approx([0.5, 0.3], abs=1e-3)
    assert method.stored_predictions(torch.tensor([2]))[0].tolist() == pytest.approx(
        [0.2 / 3, 0.5, 0.2 / 3, 0.3, 0.2 / 3], abs=1e-3)


def test_checkpoint_of_other_store_settings_is_refused_in_one_line():
    from kdlab.errors import ConfigError

    full = PSKD()
    full.setup(make_ctx())
    for other in (PSKD(store="topk"), PSKD(precision="float16")):
        with pytest.raises(ConfigError, match="method.store=.*resume with the settings") as e:
            other.load_state_dict(full.state_dict())
        assert "\n" not in str(e.value)
    topk = PSKD(store="topk", top_k=2)
    topk.setup(make_ctx())
    fresh = PSKD(store="topk", top_k=2)  # not set up: loading sizes the memory
    fresh.load_state_dict(topk.state_dict())
    assert fresh.memory_classes.shape == (N, 2)


# -- DDP: two gloo ranks write the same memory ----------------------------------------------


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        class Ctx(FakeContext):
            def all_gather(self, tensor):
                parts = [torch.empty_like(tensor) for _ in range(world)]
                dist.all_gather(parts, tensor.contiguous())
                return torch.stack(parts)

        ctx = Ctx(student=torch.nn.Identity(), num_classes=C, max_epochs=EPOCHS,
                  data={"train": (torch.zeros(N, 1), torch.zeros(N, dtype=torch.long))},
                  global_rank=rank, world_size=world)
        method = PSKD(store="topk", top_k=2, precision="float16")
        method.setup(ctx)
        method.on_train_epoch_start(ctx)
        logits = torch.randn(N, C, generator=torch.Generator().manual_seed(5))
        mine = torch.arange(rank, N, world)  # each rank its own examples
        batch = {"target": torch.zeros(len(mine), dtype=torch.long), "index": mine}
        method.loss_terms(Outputs(logits[mine]), [], batch)
        method.on_train_batch_end(ctx, batch)
        torch.save(method.state_dict(), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_hold_the_same_topk_memory(tmp_path):
    gloo_ranks(_ddp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    logits = torch.randn(N, C, generator=torch.Generator().manual_seed(5))
    probs = np.array([np_softmax(z) for z in logits.double().numpy()])
    top = np.argsort(-probs, axis=1)[:, :2]
    for state in ranks:  # every example, from whichever rank saw it
        assert state["has_memory"].all()
        assert state["memory_classes"].tolist() == top.tolist()
        np.testing.assert_allclose(state["memory"].double().numpy(),
                                   np.take_along_axis(probs, top, 1), rtol=1e-3)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
