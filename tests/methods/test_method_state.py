"""State methods resume exactly: PS-KD's memory (whole, and top-k in float16), TAID's
schedule, DKD's warm-up epoch, CRD's memory banks, ND's class means (computed once, not again
on resume), CTKD's temperature, TGeo-KD's controller with its own optimiser's state and its
class means.

For each: an uninterrupted 2-epoch fit; the same configuration interrupted after epoch 1
(its run dir's ``checkpoints/last.ckpt``), whose method state a fresh module restores; and a
fit resumed from that checkpoint (Lightning ``ckpt_path``), which must end in the same
method state (and student weights) as the uninterrupted fit.
"""

from __future__ import annotations

import pytest
import torch
from helpers.runs import fit_checkpointed as fit
from helpers.runs import module_for

from kdlab.config import compose
from kdlab.module import DistillModule

COMMON = ["dataset=digits", "trainer=cpu", "trainer.max_epochs=2",
          "trainer.enable_progress_bar=false", "student=mlp", "teacher=cnn"]

# Lightning's own deprecation noise (kdlab.train filters it outside pytest), and its notes
# that the resumed fit writes into the interrupted run's directory, which is the point here.
pytestmark = [pytest.mark.filterwarnings("ignore:.*treespec"),
              pytest.mark.filterwarnings("ignore:.*exists and is not empty")]

STATE = {
    "pskd": ("memory", "has_memory", "alpha"),
    "pskd_topk": ("memory", "memory_classes", "has_memory"),
    "taid": ("t", "momentum", "prev_objective"),
    "dkd": ("epoch",),
    "crd": ("memory_student", "memory_teacher", "normalizers", "embed_student.weight"),
    "nd": ("class_means", "has_class_means", "epoch", "projector.2.weight"),
    "ctkd": ("theta", "reversal"),
    "tgeo_kd": ("controller.4.weight", "controller_exp_avg", "controller_exp_avg_sq",
                "controller_steps", "class_means", "has_class_means"),
}


# Configurations named otherwise than their method (default: method=<name>).
OVERRIDES = {"pskd_topk": ["method=pskd", "method.store=topk", "method.top_k=3",
                           "method.precision=float16"],
             # a controller step (a hypergradient) after every batch: 6 batches an epoch
             "tgeo_kd": ["method=tgeo_kd", "+trainer.limit_train_batches=6"]}


def method_state(module: DistillModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.method.state_dict().items()}


@pytest.mark.parametrize("name", sorted(STATE))
def test_resume_restores_method_state_exactly(cache_dir, tmp_path, name):
    cfg = compose([*COMMON, *OVERRIDES.get(name, [f"method={name}"])])
    full = fit(cfg, tmp_path / "full")
    interrupted = fit(cfg, tmp_path / "interrupted", stop_after=1)
    last = tmp_path / "interrupted" / "checkpoints" / "last.ckpt"
    assert last.is_file()

    # the checkpoint holds the method state after epoch 1, and a fresh module restores it
    fresh, _ = module_for(cfg)
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    fresh.load_state_dict(ckpt["state_dict"])
    saved = method_state(interrupted)
    assert set(STATE[name]) <= set(saved)
    for key, value in method_state(fresh).items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)

    # resuming the interrupted run (in its own run dir) ends where the uninterrupted one did
    resumed = fit(cfg, tmp_path / "interrupted", ckpt_path=last)
    expected = method_state(full)
    for key, value in method_state(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7, msg=key)
    for (k, a), b in zip(resumed.student.state_dict().items(),
                         full.student.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)

    # and the state moved during the resumed epoch (the test is not vacuous)
    changed = [k for k in STATE[name] if not torch.equal(saved[k], expected[k])]
    assert changed, f"{name}: method state did not change in the second epoch"
