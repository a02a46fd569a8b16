"""Learned method parts resume exactly: DML's peer and DHKD's auxiliary head (weights and
their optimiser state), and mixup KD's random batches (the student ends where an
uninterrupted run ends).

As in test_method_state.py: an uninterrupted 2-epoch fit; the same fit interrupted after
epoch 1, whose ``last.ckpt`` a fresh module restores bit for bit; and a fit resumed from it,
which must end where the uninterrupted one did.
"""

from __future__ import annotations

import pytest
import torch
from helpers.runs import fit_checkpointed as fit
from helpers.runs import module_for

from kdlab.config import compose

COMMON = ["dataset=digits", "trainer=cpu", "trainer.max_epochs=2", "num_threads=1",
          "trainer.enable_progress_bar=false", "student=mlp", "student.hidden=[32]",
          "teacher=cnn"]  # the teacher of test_method_state.py (shared cache)

pytestmark = [pytest.mark.filterwarnings("ignore:.*treespec"),
              pytest.mark.filterwarnings("ignore:.*exists and is not empty")]

# method -> (extra overrides, the method submodule that is learned, or None)
CASES = {
    "dml": (["method.peer={_target_: kdlab.models.small.mlp, hidden: [24]}"], "peer"),
    "dhkd": ([], "aux_head"),
    "mixup_kd": (["method.mixed_fraction=0.5"], None),
}


def part_state(module, part):
    """The learned part's weights and its optimiser state (momentum buffers), by name."""
    if part is None:
        return {}
    sub = getattr(module.method, part)
    weights = {f"w.{k}": v.detach().clone() for k, v in sub.state_dict().items()}
    optimizer = module.trainer.optimizers[0]
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    state = optimizer.state_dict()["state"]
    momentum = {f"m.{n}": state[index[id(p)]]["momentum_buffer"].clone()
                for n, p in sub.named_parameters()}
    assert momentum, part
    return {**weights, **momentum}


@pytest.mark.parametrize("name", sorted(CASES))
def test_learned_parts_resume_exactly(cache_dir, tmp_path, name):
    extra, part = CASES[name]
    cfg = compose([*COMMON, f"method={name}", *extra])
    full = fit(cfg, tmp_path / "full")
    interrupted = fit(cfg, tmp_path / "interrupted", stop_after=1)
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    saved = part_state(interrupted, part)

    # the checkpoint holds the part and its optimiser state exactly
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    fresh, _ = module_for(cfg)
    if part is not None:
        fresh.method.setup(fresh.context)  # what Lightning does before restoring a checkpoint
        fresh.load_state_dict(ckpt["state_dict"])
        for key, value in getattr(fresh.method, part).state_dict().items():
            assert torch.equal(value, saved[f"w.{key}"]), key
        params = list(fresh.student.parameters()) + fresh.method.extra_parameters()
        offset = len(list(fresh.student.parameters()))
        ckpt_state = ckpt["optimizer_states"][0]["state"]
        for i, (n, _) in enumerate(getattr(fresh.method, part).named_parameters()):
            assert torch.equal(ckpt_state[offset + i]["momentum_buffer"], saved[f"m.{n}"]), n
        assert len(params) == len(ckpt["optimizer_states"][0]["param_groups"][0]["params"])

    # resuming ends where the uninterrupted fit ended: the part, its optimiser state, the student
    resumed = fit(cfg, tmp_path / "interrupted", ckpt_path=last)
    expected = part_state(full, part)
    for key, value in part_state(resumed, part).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)
    for (k, a), b in zip(resumed.student.state_dict().items(),
                         full.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)
    # and the second epoch moved the part or the student (the comparison is not vacuous)
    if part is not None:
        assert any(not torch.equal(saved[k], expected[k]) for k in saved)
    else:
        moved = [not torch.equal(a, b) for a, b in zip(
            interrupted.student.state_dict().values(), full.student.state_dict().values(),
            strict=True)]
        assert any(moved)
