"""Methods that exercise the growing parts of the method contract (tests/test_contract.py).

Each checks, while training, what the contract promises it, and reports in results()."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdlab.methods.base import Method, cross_entropy


class TransformProbe(Method):
    """Trains on negated inputs; checks that the teachers saw the transformed batch."""

    name = "transform_probe"

    def __init__(self):
        super().__init__()
        self.checked = 0
        self.worst = 0.0

    def on_fit_start(self, ctx):
        self.ctx = ctx

    def transform_batch(self, batch, ctx):
        return {**batch, "input": -batch["input"], "soft_target": F.one_hot(
            batch["target"], ctx.num_classes).float()}

    def loss_terms(self, student, teachers, batch):
        fresh = self.ctx.teacher_outputs(batch["input"])[0].logits
        self.worst = max(self.worst, float((fresh - teachers[0].logits).abs().max()))
        self.checked += 1
        return {"soft_ce": -(batch["soft_target"] * F.log_softmax(student.logits.float(), -1))
                .sum(-1).mean()}

    def results(self):
        return {"probe": {"checked": self.checked, "worst": self.worst}}


class ViewProbe(Method):
    """Asks for the strong view and trains on both views."""

    name = "view_probe"
    needs_teacher = False
    input_views = ("strong",)

    def __init__(self):
        super().__init__()
        self.shapes_ok = 0
        self.differs = 0

    def on_fit_start(self, ctx):
        self.ctx = ctx

    def loss_terms(self, student, teachers, batch):
        strong = batch["input_strong"]
        self.shapes_ok += int(strong.shape == batch["input"].shape)
        self.differs += int(not torch.equal(strong, batch["input"]))
        return {"ce": cross_entropy(student.logits, batch["target"]),
                "ce_strong": cross_entropy(self.ctx.student(strong), batch["target"])}

    def results(self):
        return {"probe": {"shapes_ok": self.shapes_ok, "differs": self.differs}}


class PeerProbe(Method):
    """Trains a linear peer with CE next to the student (online, no teacher)."""

    name = "peer_probe"
    needs_teacher = False

    def setup(self, ctx):
        if not hasattr(self, "peer"):
            self.peer = nn.Sequential(nn.Flatten(), nn.Linear(64, ctx.num_classes)).to(ctx.device)

    def evaluated_models(self):
        return {"peer": self.peer}

    def loss_terms(self, student, teachers, batch):
        return {"ce": cross_entropy(student.logits, batch["target"]),
                "peer_ce": cross_entropy(self.peer(batch["input"]), batch["target"])}


class ContextProbe(Method):
    """CE, and a record of what the run context says in each hook (tests/test_context.py).
    Keeps the context as an attribute, as any method may."""

    name = "context_probe"

    def __init__(self):
        super().__init__()
        self.ctx = None
        self.seen: dict = {"step_ends": []}

    def setup(self, ctx):
        self.ctx = ctx

    def on_fit_start(self, ctx):
        index = torch.tensor([3, 1])
        train = ctx.examples("train", index)
        with ctx.precision_context():
            self.seen["fit_start"] = {
                "same_ctx": ctx is self.ctx,
                **{k: getattr(ctx, k) for k in (
                    "num_classes", "input_shape", "train_size", "batch_size", "max_epochs",
                    "total_steps", "current_lr", "seed", "device", "global_rank", "world_size",
                    "is_global_zero", "run_dir", "noise_mask", "current_epoch", "global_step")},
                "student": ctx.student, "teachers": tuple(ctx.teachers),
                "val": ctx.examples("val"), "train": train,
                "teacher_outputs": ctx.teacher_outputs(train["input"])[0].logits,
                "clean_train_teacher_outputs": ctx.clean_train_teacher_outputs(train)[0].logits,
                "all_gather": ctx.all_gather(torch.tensor([2.0, 5.0])),
            }

    def on_train_epoch_start(self, ctx):
        self.seen["epoch_start"] = (ctx.current_epoch, ctx.global_step)

    def on_train_batch_end(self, ctx, batch):
        self.seen["step_ends"].append(ctx.global_step)

    def loss_terms(self, student, teachers, batch):
        return {"ce": cross_entropy(student.logits, batch["target"])}
