"""Deep mutual learning (Zhang, Xiang, Hospedales, Lu, "Deep Mutual Learning", CVPR 2018,
arXiv 1706.00384).

Two networks learn together from scratch, each from the labels and from the other one's
current prediction. With s the student's and q the peer's logits, p^T(z) = softmax(z / T):

    L_student = w_ce * CE(s, y) + w_kl * T^2 * KL( stopgrad(p^T(q)) || p^T(s) )
    L_peer    = w_ce * CE(q, y) + w_kl * T^2 * KL( stopgrad(p^T(s)) || p^T(q) )

KL summed over classes, averaged over the batch; T = 1, w_ce = w_kl = 1 in the paper. Each
network gets gradients only from its own two terms (the other's output is detached). The
four terms are returned separately (``ce``, ``kl``, ``peer_ce``, ``peer_kl``) and summed by
the module into one optimiser step of both networks -- the paper's Algorithm 1 updates them
one after the other, recomputing the predictions in between; the simultaneous update is what
most re-implementations do and what one optimiser step per batch allows.

The peer is a submodule of the method (``peer``: a model config node with ``_target_``, or
a model name of conf/model; the YAML default is the student's own architecture config). It
is built in ``setup`` with its own seed (so it does not start from the student's weights),
trained with the student's optimiser and schedule (``extra_parameters``), put in train/eval
mode with the student, saved and restored with checkpoints, synced by DDP, and tested like
the student (``results.json["peers"]["peer"]``). No teacher.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import build_model, model_config
from .base import Method, MethodContext, Outputs, cross_entropy, kd_kl

PEER_SEED_OFFSET = 7919  # the peer's initialisation seed: run seed + this
# The peer option: a model name, a model config node, or None (a fresh copy of the student).
Peer = str | Mapping[str, Any] | None


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def peer_spec(peer: Peer) -> str | dict[str, Any] | None:
    """The peer option as a model name or a plain dict (``None``: copy the student)."""
    if not isinstance(peer, Mapping):
        return peer
    spec = dict(peer)
    if "_target_" not in spec:
        raise ConfigError(f"method.peer needs a _target_ (got keys {sorted(spec)}); give "
                          "a model config node or a model name such as cnn_small")
    return spec


def fresh_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every layer re-initialised (``reset_parameters``)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return clone


def build_peer(spec: Any, ctx) -> nn.Module:
    """The peer network for this run, initialised from its own seed, on the student's device
    and memory format."""
    device = next(ctx.student.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(ctx.seed) + PEER_SEED_OFFSET)
        if spec is None:
            peer = fresh_copy(ctx.student)
        else:
            peer = build_model(spec, int(ctx.num_classes), tuple(ctx.input_shape),
                               where="method.peer")
    return peer.to(device=device, memory_format=torch.channels_last)


class DML(Method):
    name = "dml"
    description = "Deep mutual learning: student and a peer, each CE + KL to the other (online)"
    needs_teacher = False
    distill_term = "kl"  # the names of the distillation terms: kl and peer_kl

    def __init__(self, peer: Peer = None, ce_weight: float = 1.0, kl_weight: float = 1.0,
                 temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {temperature}")
        self.peer_config = peer_spec(peer)
        self.peer: nn.Module | None = None  # built in setup() (replaces the option's value)
        self.ctx: MethodContext | None = None  # the run, from setup()

    def check(self, student, teachers) -> None:
        if isinstance(self.peer_config, str):
            model_config(self.peer_config)  # an unknown model name fails before any work

    def setup(self, ctx) -> None:
        self.ctx = ctx
        if self.peer is None:  # idempotent: setup runs for every stage
            self.peer = build_peer(self.peer_config, ctx)

    def evaluated_models(self) -> dict[str, nn.Module]:
        return {"peer": self.peer} if self.peer is not None else {}

    def peer_logits(self, batch) -> Tensor:
        if self.peer is None:
            raise RuntimeError(f"{self.name}'s peer is not built: setup(ctx) must run first")
        return self.peer(batch["input"])

    def mutual_terms(self, student_logits: Tensor, peer_logits: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """The two distillation terms (student's, peer's), before weighting."""
        # T^2 KL(stopgrad(partner) || network): each term's gradient reaches one network
        return (kd_kl(student_logits, peer_logits.detach(), self.temperature),
                kd_kl(peer_logits, student_logits.detach(), self.temperature))

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        s, q, y = student.logits, self.peer_logits(batch), batch["target"]
        student_term, peer_term = self.mutual_terms(s, q)
        return {
            "ce": self.ce_weight * cross_entropy(s, y),
            self.distill_term: self.kl_weight * student_term,
            "peer_ce": self.ce_weight * cross_entropy(q, y),
            f"peer_{self.distill_term}": self.kl_weight * peer_term,
        }
