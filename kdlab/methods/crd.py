"""Contrastive representation distillation, CRD (Tian, Krishnan, Isola, "Contrastive
Representation Distillation", ICLR 2020, arXiv 1910.10699), as in the authors' code
(RepDistiller), with N training examples and K negatives per example:

    v_s = g_s(h_s) / |g_s(h_s)|,  v_t = g_t(h_t) / |g_t(h_t)|     128-d embeddings of the
                                  penultimate features h (g: learnable linear maps)
    M_s, M_t                      memory banks (N x 128): a running embedding per example
    J_i = (i, j_1 .. j_K)         the example itself, then K examples of other classes drawn
                                  uniformly without replacement
    P_s[i, k] = exp(<M_t[J_ik], v_s,i> / tau) / Z_s       (student anchor, teacher memory)
    P_t[i, k] = exp(<M_s[J_ik], v_t,i> / tau) / Z_t       (teacher anchor, student memory)
    NCE(P)    = -1/B sum_i [ log( P_i0 / (P_i0 + K/N) )
                             + sum_{k>=1} log( (K/N) / (P_ik + K/N) ) ]
    L         = w_ce * CE(s, y) + w * ( NCE(P_s) + NCE(P_t) )

(1e-7 is added to both denominators, as in the authors' code.) Z_s and Z_t are set once, at
the first step, to the mean of the unnormalised exp-scores times N, and then kept. After each
optimiser step the rows of the batch's examples move towards the new embeddings:
M[i] <- normalise(m * M[i] + (1 - m) * v_i), momentum m = 0.5. Defaults: tau = 0.07,
K = 16384, w = 0.8, w_ce = 1, 128-d embeddings.

kdlab choices: K is capped at the smallest pool of other-class examples (the authors' code
draws with replacement when K exceeds it, which only happens on small training sets), and
the scores are taken as (M h) then gathered, which gives the same values as gathering the
(B, K+1, 128) rows first without allocating them.

State (module buffers, saved in checkpoints): ``memory_student`` and ``memory_teacher``
(N x 128; initialised uniform in [-a, a], a = 1/sqrt(128/3), from the run seed so every DDP
rank starts alike), ``normalizers`` (Z_s, Z_t; -1 = not set yet). The train labels and the
examples sorted by class (for the negatives; ``train_labels``, ``by_class``: N int64 each,
not saved) are read once per fit from the un-augmented train split. The negatives are drawn
from the method's own generator, seeded at every epoch start from (seed, epoch, rank), so a
resumed run draws the same ones. The embeddings are built
in ``setup`` and trained with the student. Under DDP the new embeddings and the first step's
Z are gathered from all ranks, so every rank holds the same banks. One teacher; the batch
must carry ``index``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.features import PENULTIMATE, feature_shapes
from .base import (
    Method,
    Outputs,
    StateBuffer,
    StateSizes,
    cross_entropy,
    epoch_seed,
    gather_from_ranks,
    require_teachers,
)

NCE_EPS = 1e-7


def embed(head: nn.Linear, feature: Tensor) -> Tensor:
    """L2-normalised linear embedding of a flattened feature, in float32."""
    return F.normalize(head(feature.float().flatten(1)), dim=1)


def contrast_scores(memory: Tensor, anchor: Tensor, index: Tensor, temperature: float
                    ) -> Tensor:
    """exp(<memory[index[i, k]], anchor[i]> / tau), shape (B, K+1). The memory is read, never
    differentiated."""
    all_scores = memory.detach() @ anchor.T  # (N, B): every row of the bank against each anchor
    picked = all_scores.T.gather(1, index)  # (B, K+1)
    return torch.exp(picked / temperature)


def nce_loss(probs: Tensor, n_data: int) -> Tensor:
    """NCE with the positive in column 0 and uniform noise 1/N, K = columns - 1."""
    k = probs.shape[1] - 1
    noise = k / float(n_data)
    positive = torch.log(probs[:, 0] / (probs[:, 0] + noise + NCE_EPS))
    negative = torch.log(noise / (probs[:, 1:] + noise + NCE_EPS))
    return -(positive.sum() + negative.sum()) / probs.shape[0]


def momentum_update(memory: Tensor, index: Tensor, embedding: Tensor, momentum: float) -> None:
    """M[i] <- normalise(m M[i] + (1 - m) v_i), in place."""
    moved = memory[index] * momentum + embedding.to(memory.dtype) * (1.0 - momentum)
    memory[index] = F.normalize(moved, dim=1)


class CRD(Method):
    name = "crd"
    description = "CRD: CE + w * contrastive NCE of student/teacher embeddings, memory banks"
    student_features = (PENULTIMATE,)
    teacher_features = (PENULTIMATE,)

    def __init__(self, feat_dim: int = 128, num_negatives: int = 16384,
                 nce_temperature: float = 0.07, momentum: float = 0.5, weight: float = 0.8,
                 ce_weight: float = 1.0):
        super().__init__()
        self.embed_student: nn.Linear | None = None  # built in setup() from probed widths
        self.embed_teacher: nn.Linear | None = None
        self.register_buffer("memory_student", torch.zeros(0, self.feat_dim))
        self.register_buffer("memory_teacher", torch.zeros(0, self.feat_dim))
        self.register_buffer("normalizers", torch.tensor([-1.0, -1.0]))
        # Labels of the train split (for the negatives), read in on_fit_start; not saved.
        self.register_buffer("train_labels", torch.zeros(0, dtype=torch.long), persistent=False)
        # The train examples sorted by class (for the negatives), from train_labels; not saved.
        self.register_buffer("by_class", torch.zeros(0, dtype=torch.long), persistent=False)
        self._negatives = 0
        self._class_counts: list[int] = []
        self._class_starts: list[int] = []
        self._generator: torch.Generator | None = None  # the negatives' draws (reseed())
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None
        self._z_set_this_step = False
        self._z_ready = False  # normalizers set; read once from the buffer (a host sync)

    # -- set-up ----------------------------------------------------------------------------
    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)

    def setup(self, ctx) -> None:
        self.check(ctx.student, ctx.teachers)
        device = next(ctx.student.parameters()).device
        if self.embed_student is None:  # idempotent: setup runs for every stage
            shape = tuple(ctx.input_shape)
            (d_s,) = feature_shapes(ctx.student, (PENULTIMATE,), shape)[PENULTIMATE]
            (d_t,) = feature_shapes(ctx.teachers[0], (PENULTIMATE,), shape)[PENULTIMATE]
            self.embed_student = nn.Linear(d_s, self.feat_dim).to(device)
            self.embed_teacher = nn.Linear(d_t, self.feat_dim).to(device)
        n = int(ctx.train_size)
        if self.memory_student.shape[0] != n:
            g = torch.Generator().manual_seed(int(ctx.seed))
            bound = 1.0 / math.sqrt(self.feat_dim / 3)
            for name in ("memory_student", "memory_teacher"):
                bank = (torch.rand(n, self.feat_dim, generator=g) * 2 - 1) * bound
                setattr(self, name, bank.to(device))

    def state_buffers(self, sizes: StateSizes) -> dict[str, StateBuffer]:
        bank = StateBuffer((sizes.num_examples, self.feat_dim), torch.float32)
        ids = StateBuffer((sizes.num_examples,), torch.int64)
        return {"memory_student": bank, "memory_teacher": bank, "train_labels": ids,
                "by_class": ids}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A method that has not run setup() yet (e.g. DistillModule.load_from_checkpoint) takes
        # its embeddings' and banks' sizes from the checkpoint.
        for part in ("embed_student", "embed_teacher"):
            weight = state_dict.get(f"{prefix}{part}.weight")
            if weight is not None and getattr(self, part) is None:
                setattr(self, part, nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device))
        for name in ("memory_student", "memory_teacher"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        self._z_ready = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def on_fit_start(self, ctx) -> None:
        """Read the train split's labels (in chunks) to draw negatives of other classes."""
        n = int(ctx.train_size)
        labels = torch.cat([ctx.examples("train", chunk)["target"].long()
                            for chunk in torch.arange(n).split(4096)])
        self.set_train_labels(labels.to(self.memory_student.device))

    def set_train_labels(self, labels: Tensor) -> None:
        """Index the train split by class, for drawing negatives of other classes."""
        counts = torch.bincount(labels)
        pool = int(labels.numel() - counts.max())
        if pool <= 0:
            raise ConfigError("crd needs examples of at least two classes in the train split")
        self.train_labels = labels
        self.by_class = torch.argsort(labels, stable=True)  # the examples, class by class
        self._class_counts = counts.tolist()
        self._class_starts = (torch.cumsum(counts, 0) - counts).tolist()
        self._negatives = min(self.num_negatives, pool)

    def reseed(self, seed: int) -> None:
        """Seed the generator the negatives are drawn from."""
        self._generator = torch.Generator(device=self.memory_student.device)
        self._generator.manual_seed(int(seed))

    def on_train_epoch_start(self, ctx) -> None:
        self.reseed(epoch_seed(ctx, salt=1))

    # -- loss ------------------------------------------------------------------------------
    def contrast_indices(self, index: Tensor) -> Tensor:
        """(B, K+1): each example's own index, then K distinct examples of other classes,
        drawn uniformly (the first K of a random permutation of the other classes' examples,
        one permutation per example)."""
        n, device = self.train_labels.shape[0], self.train_labels.device
        rows = []
        for c in self.train_labels[index].tolist():
            start, count = self._class_starts[c], self._class_counts[c]
            picked = torch.randperm(n - count, device=device,
                                    generator=self._generator)[:self._negatives]
            picked = picked + (picked >= start) * count  # skip the block of class c
            rows.append(self.by_class[picked])
        return torch.cat([index[:, None], torch.stack(rows)], dim=1)

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        if self.embed_student is None or self.train_labels.numel() == 0:
            raise RuntimeError("crd is not set up: setup(ctx) and on_fit_start(ctx) must run")
        index = batch["index"].to(self.train_labels.device)
        contrast = self.contrast_indices(index)
        with torch.autocast(student.logits.device.type, enabled=False):  # exp(score / 0.07)
            v_s = embed(self.embed_student, student.features[PENULTIMATE])
            v_t = embed(self.embed_teacher, teachers[0].features[PENULTIMATE])
            scores_s = contrast_scores(self.memory_teacher, v_s, contrast, self.nce_temperature)
            scores_t = contrast_scores(self.memory_student, v_t, contrast, self.nce_temperature)
            n = self.memory_student.shape[0]
            if not self._z_ready:
                self._z_ready = bool(self.normalizers[0] > 0)
                self._z_set_this_step = not self._z_ready
            if self._z_set_this_step:
                self.normalizers.copy_(torch.stack([scores_s.detach().mean() * n,
                                                    scores_t.detach().mean() * n]))
            crd = (nce_loss(scores_s / self.normalizers[0], n)
                   + nce_loss(scores_t / self.normalizers[1], n))
        self._pending = (index, v_s.detach(), v_t.detach())
        return {
            "ce": self.ce_weight * cross_entropy(student.logits, batch["target"]),
            "crd": self.weight * crd,
        }

    @torch.no_grad()
    def on_train_batch_end(self, ctx, batch) -> None:
        """Move the batch's memory rows towards its embeddings (all ranks' batches)."""
        if self._z_set_this_step:
            if ctx.world_size > 1:  # every rank keeps the same Z
                self.normalizers.copy_(ctx.all_gather(self.normalizers).mean(0))
            self._z_set_this_step, self._z_ready = False, True
        if self._pending is None:
            return
        index, v_s, v_t = (gather_from_ranks(ctx, t) for t in self._pending)
        self._pending = None
        momentum_update(self.memory_student, index, v_s, self.momentum)
        momentum_update(self.memory_teacher, index, v_t, self.momentum)
