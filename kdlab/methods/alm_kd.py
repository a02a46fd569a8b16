"""ALM-KD: adaptive loss mixing, per-example weights meta-learned on clean data.

Sivasubramanian, Shenoy, Prathosh AP, Ramakrishnan, "ALM-KD: Knowledge Distillation with
noisy labels via adaptive loss mixing", arXiv 2202.03250 (later "Adaptive Mixing of
Auxiliary Losses in Supervised Learning", AAAI 2023). Why kdlab's defaults differ from the
paper, with the measurements: docs/methods.md and scripts/results/alm_noise_notes.md.

Student loss with K teachers; every training example i has its own mixing weights
lambda_i = (l_i0, l_i1 .. l_iK), a row of the table ``mixing_weights`` (N_train, K+1):

    L = mean_i [ l_i0 CE(s_i, y~_i) + sum_m l_im T^2 KL( softmax(t_m,i / T) || softmax(s_i / T) ) ]

y~ are the (possibly noisy) training labels, T = 4. Initial rows: teacher columns 0.9,
label column 1 - max(teacher columns) = 0.1 (convex mode: label 0.1, each teacher 0.9 / K).

Meta pass. Every ``meta_every`` epochs from ``meta_start`` (``auto``: every 5 % of the
run's epochs, from the first such epoch: 10 / 10 in the authors' 200 epochs, 2 / 2 in
digits' 30), at the start of the epoch, the train split is walked in chunks B of
``chunk_batches`` x b examples (b = ``dataset.batch_size``) of a permutation seeded by
(seed, epoch): the same chunks on every DDP rank and on resume, whatever the number of
ranks. With the student in eval mode,
one simulated SGD step of the last layer o = W h + b with a per-example step s on the
chunk's mixed loss (g_ij = d(term j of example i)/do_i in closed form: :mod:`.lookahead`),

    W'(lambda) = W - s sum_{i in B} (sum_j l_ij g_ij) h_i^T,   b'(lambda) = b - s sum_i (..)

is scored on a clean meta batch V (``meta_batch_size`` examples of the meta split, drawn
per chunk from (seed, epoch, chunk)):

    L_meta(lambda) = mean_{v in V} CE(W'(lambda) h_v + b'(lambda), y_v)

and the chunk's rows move against its gradient, ``inner_steps`` times:

    lambda_B <- P( lambda_B - meta_lr * u * dL_meta / dlambda_B )

P clamps to [clamp_min, clamp_max] (``combination: free``, the authors' final code) or
projects onto the simplex (``convex``, below). ``lookahead: full``: one SGD step of the
whole student instead, differentiated through (exact, costlier). The simulated step is
plain SGD, as in the paper. ``paper: true``: ``step_scale: authors``, ``kernel: raw``,
``rebalance: 0``, ``row_update: raw``, with the other defaults the authors' final code.

The step, ``step_scale``. For one inner step, with r_v = softmax(o'_v) - e_{y_v} the
residuals after the step and M = |V|:

    dL_meta/dl_ij = -s (1/M) sum_{v in V} (h_i . h_v + 1) <r_v, g_ij>  =  s E_ij      (*)

linear in s, a mean over V, and ~2/C of V contributes (the pairs of y~_i's class or the true
class), so it shrinks like 1/C in the number of classes C.

* ``authors``: s = lr_t / b (lr_t the student's current lr, b the batch the training loss
  is averaged over: ``dataset.batch_size`` x the DDP ranks) and u = 1: with ``meta_lr:
  1500``, their algorithm (the update shrinks with every lr decay, changes with b and C).
* ``auto`` (default): the same s, and u = (lr_A / b_A) / s * (C / C_A), so that

      meta_lr u dL_meta/dl_ij = meta_lr (lr_A / b_A) (C / C_A) E_ij

  with the authors' CIFAR-100 setting A (ResNet56 -> ResNet8: lr_A = 0.1, b_A = 128,
  C_A = 100), where u = 1: the same move per unit of evidence E at any lr, schedule, b,
  chunk and meta batch (to first order), corrected for the 1/C dilution.

``kernel``: ``raw`` (the paper) or ``centered`` (:mod:`.lookahead`: W stepped on h - mu,
the class biases fixed, the kernel (h_i - mu) . (h_v - mu) normalised to mean diagonal
``kernel_scale`` over V). Pooled ReLU features make h_i . h_v + 1 nearly a constant k, so
(*) ~ -s k <mean_v r_v, g_ij> scores a row by the student's class marginals on V, not by
whether y~_i is right; centred, that component drops out.

Global rebalancing, ``rebalance``. With ``rebalance`` > 0 the loss uses c_j l_ij, one
learned scale c_j per column (initial 1, clamped to [clamp_min, ``scale_max``]), fixed
during a pass; at its end, from the raw kernel's gradients at the rows of the pass start
(``lookahead: full``: its exact gradient), summed over every chunk of every rank (so
independent of the number of ranks):

    c_j <- clip( c_j - rebalance inner_steps meta_lr (1/N) sum_i u l_ij dL_meta/d(c_j l_ij) )

The rows move with d/dl_ij = c_j d/d(c_j l_ij).

Row update, ``row_update`` (why, measured on Fashion-MNIST: docs/methods.md). ``raw``: the
step above, meta_lr u g (its size follows the size of the evidence, which depends on the
data). ``rms`` divides each column of a chunk's g by its root mean square over the chunk's
rows; ``zscore`` first centres it on the chunk's mean:

    l_ij <- P( l_ij - row_step (lr_t / peak lr) (g_ij - gbar_j) / sd_j(g) )        (zscore)

Convex mode (``combination: convex``): rows stay on the simplex with the early code's step,
l <- clip_[0, 1](l - meta_lr u (g_1 - g_0)) for rows (1 - l, l); for K teachers
rows <- proj_simplex(rows - 2 meta_lr u (g - mean_j g_j)).

The table is module state (a buffer): saved in checkpoints, restored on resume. Under DDP
every rank updates the rows of its share of the chunks and :func:`~.lookahead.sync_rows`
merges them so all ranks hold the same table. The noise mask of the data (which labels were
changed) is read only for reporting (:mod:`.alm_kd_report`), never by training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.features import find_classifier
from . import alm_kd_report as report
from .alm_kd_plots import LABEL_WEIGHTS, plot_mixing_history
from .base import Method, MethodContext, Outputs, StateBuffer, StateSizes, kd_kl, require_teachers
from .lookahead import (
    Kernel,
    Lookahead,
    check_kernel_scale,
    eval_mode,
    full_lookahead_meta_grad,
    last_layer_meta_grad,
    meta_pick,
    pass_chunks,
    penultimate_and_logits,
    sync_rows,
    sync_sum,
    work_dtype,
)

Combination = Literal["free", "convex"]
StepScale = Literal["auto", "authors"]
RowUpdate = Literal["raw", "rms", "zscore"]
RUN_PLOT = "alm_mixing_weights.png"  # the weights over training, in the run directory

# The authors' CIFAR-100 setting (ResNet56 -> ResNet8), where step_scale=auto is their step.
AUTHORS_LR = 0.1
AUTHORS_BATCH = 128
AUTHORS_CHUNK_BATCHES = 3
AUTHORS_CLASSES = 100

# -- the step, and the constraints on the rows -----------------------------------------------


def simulated_step(step_scale: str, lr: float, batch_size: int, num_classes: int
                   ) -> tuple[float, float]:
    """(s, u): the per-example step of the simulated SGD step, s = lr / b (b the train batch
    the loss is averaged over), and the factor on meta_lr: ``authors`` u = 1, ``auto``
    u = (lr_A / b_A) / s * C / C_A (1 in the authors' setting; the module docstring)."""
    s = max(float(lr), 1e-12) / int(batch_size)  # lr 0 (end of a schedule): first order
    if step_scale == "authors":
        return s, 1.0
    if step_scale == "auto":
        return s, (AUTHORS_LR / AUTHORS_BATCH) / s * num_classes / AUTHORS_CLASSES
    raise ConfigError(f"method.step_scale must be auto or authors, got {step_scale!r}")


def project_simplex(rows: Tensor) -> Tensor:
    """Euclidean projection of each row onto {w : w >= 0, sum w = 1} (sort-based)."""
    u, _ = rows.sort(dim=1, descending=True)
    cumsum = u.cumsum(1) - 1.0
    k = torch.arange(1, rows.shape[1] + 1, device=rows.device, dtype=rows.dtype)
    support = (u - cumsum / k) > 0  # true on a prefix of the sorted row
    rho = support.sum(1, keepdim=True).clamp_min(1)
    theta = cumsum.gather(1, rho - 1) / rho.to(rows.dtype)
    return (rows - theta).clamp_min(0.0)


def constrained_step(rows: Tensor, grad: Tensor, lr: float, combination: str,
                     clamp_min: float, clamp_max: float) -> Tensor:
    """One projected step of the rows (see "Convex mode" in the module docstring)."""
    if combination == "convex":
        rows64, grad64 = rows.double(), grad.double()  # float32 rounds large steps off
        centred = grad64 - grad64.mean(1, keepdim=True)
        return project_simplex(rows64 - 2.0 * lr * centred).to(rows.dtype)
    return (rows - lr * grad).clamp(clamp_min, clamp_max)


def normalized_grad(grad: Tensor, row_update: str) -> Tensor:
    """The meta-gradient of a chunk's rows on a fixed scale (see "Row update" above): each
    column divided by its root mean square over the chunk (``rms``), or first centred on
    its mean over the chunk (``zscore``: mean 0, standard deviation 1); ``raw``: as it is."""
    if row_update == "raw":
        return grad
    if row_update == "zscore":
        grad = grad - grad.mean(0, keepdim=True)
    scale = grad.pow(2).mean(0, keepdim=True).sqrt()
    return grad / scale.clamp_min(torch.finfo(grad.dtype).tiny)


def initial_weights(n: int, k: int, teacher_weight: float, combination: str) -> Tensor:
    """Rows (1 - w, w, .., w) (free) or (1 - w, w/K, .., w/K) (convex) for every example."""
    table = torch.empty(n, k + 1)
    per_teacher = teacher_weight / k if combination == "convex" else teacher_weight
    table[:, 1:] = per_teacher
    table[:, 0] = 1.0 - (teacher_weight if combination == "convex" else per_teacher)
    return table


# -- what a meta pass reads from the run ---------------------------------------------------


@dataclass
class MetaPassInputs:
    """Everything a meta pass needs from the running module, gathered in one place
    (:meth:`ALMKD._meta_pass_inputs`) so the pass itself never touches ``ctx``."""

    student: nn.Module
    device: torch.device
    lr: float
    epoch: int
    seed: int
    batch_size: int  # the train batch over which the training loss is averaged
    chunk_base: int  # examples per batch in a chunk (dataset.batch_size, not x ranks)
    rank: int
    world: int
    n_train: int
    train_batch: Callable[[Tensor], dict[str, Tensor]]  # positions -> model batch
    meta_batches: Callable[[], list[dict[str, Tensor]]]  # the whole meta split
    teacher_logits: Callable[[dict[str, Tensor]], Tensor]  # model batch -> (K, n, C)
    precision: Callable[[], Any]  # the trainer's autocast context


class ALMKD(Method):
    name = "alm_kd"
    description = ("ALM-KD: per-example label/teacher loss weights meta-learned on the clean "
                   "meta split (one-step lookahead)")
    report_plots = (LABEL_WEIGHTS,)
    run_plots = {RUN_PLOT: "ALM-KD mixing weights, run by run"}

    def __init__(self, temperature: float = 4.0, combination: Combination = "free",
                 lookahead: Lookahead = "last_layer", paper: bool = False,
                 step_scale: StepScale = "auto", kernel: Kernel = "centered",
                 kernel_scale: float = 1000.0, rebalance: float = 100.0,
                 scale_max: float | None = None, meta_every: int | Literal["auto"] = "auto",
                 meta_start: int | Literal["auto"] = "auto", meta_lr: float = 1500.0,
                 inner_steps: int = 5, chunk_batches: int = 3, meta_batch_size: int = 1000,
                 init_teacher_weight: float = 0.9, clamp_min: float = 1e-7,
                 clamp_max: float = 2.0, row_update: RowUpdate = "zscore", row_step: float = 0.1,
                 plot: bool = True):
        super().__init__()
        if paper:  # the authors' algorithm: their step and kernel, no global scales, raw rows
            vars(self).update(step_scale="authors", kernel="raw", rebalance=0.0, row_update="raw")
        check_kernel_scale(kernel_scale)
        for key, value, low in (("meta_every", meta_every, 1), ("meta_start", meta_start, 0)):
            if value != "auto" and value < low:
                raise ConfigError(f"method.{key} must be auto or an integer >= {low}, "
                                  f"got {value!r}")
        if inner_steps < 0 or chunk_batches < 1 or not clamp_min <= clamp_max:
            raise ConfigError("method.chunk_batches must be >= 1, method.inner_steps >= 0 and "
                              f"method.clamp_min <= clamp_max (got {clamp_min}, {clamp_max})")
        self.scale_max = clamp_max if scale_max is None else scale_max
        # (N_train, K+1); sized in setup() once the data and the teachers are known.
        self.register_buffer("mixing_weights", torch.zeros(0, 0))
        # (K+1,) global column scales (rebalance); ones = no rebalancing.
        self.register_buffer("column_scales", torch.zeros(0))
        # The highest learning rate a meta pass has seen (rms / zscore: row steps follow lr).
        self.register_buffer("peak_lr", torch.zeros((), dtype=torch.float64))
        # One record per meta pass; epoch -1 = initial weights.
        self.history: list[report.PassRecord] = []
        self._noise_mask: Tensor | None = None  # reporting only

    # -- state -----------------------------------------------------------------------------
    @property
    def num_teachers(self) -> int:
        return max(self.mixing_weights.shape[1] - 1, 0)

    @property
    def column_names(self) -> list[str]:
        k = self.num_teachers
        return ["label"] + (["teacher"] if k == 1 else [f"teacher{m}" for m in range(k)])

    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers))
        find_classifier(student)  # the last-layer lookahead needs a final linear layer

    def setup(self, ctx: MethodContext) -> None:
        every = max(1, round(int(ctx.max_epochs) / 20))  # auto: 5 % of the run
        self.meta_every = every if self.meta_every == "auto" else self.meta_every
        self.meta_start = self.meta_every if self.meta_start == "auto" else self.meta_start
        k = len(ctx.teachers)
        require_teachers(self.name, k)
        n = int(ctx.train_size)
        self._noise_mask = ctx.noise_mask  # for the summaries and the AUROC only
        if tuple(self.mixing_weights.shape) != (n, k + 1):
            self.mixing_weights = initial_weights(
                n, k, self.init_teacher_weight, self.combination).to(self.mixing_weights.device)
        if self.column_scales.shape != (k + 1,):
            self.column_scales = torch.ones(k + 1, device=self.mixing_weights.device)

    def state_buffers(self, sizes: StateSizes) -> dict[str, StateBuffer]:
        shape = (sizes.num_examples, sizes.num_teachers + 1)
        return {"mixing_weights": StateBuffer(shape, torch.float32)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before peak_lr existed: no pass has set it yet
        state_dict.setdefault(prefix + "peak_lr", torch.zeros((), dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> Tensor:
        """The meta-pass history as one float tensor (checkpoints stay tensors-only)."""
        return report.encode_history(self.history)

    def set_extra_state(self, state: Tensor) -> None:
        self.history = report.merge_history(self.history, state)

    def loss_weights(self, index: Tensor) -> Tensor:
        """(n, K+1) the weights of the loss terms of these train examples."""
        lam = self.mixing_weights[index].float()
        if self.column_scales.numel():
            lam = lam * self.column_scales.float()
        return lam

    # -- training loss ---------------------------------------------------------------------
    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        if len(teachers) != self.num_teachers:
            raise ConfigError(f"alm_kd's weight table has {self.num_teachers} teacher columns "
                              f"but {len(teachers)} teachers were given")
        lam = self.loss_weights(batch["index"])
        logits = student.logits.float()
        ce = F.cross_entropy(logits, batch["target"], reduction="none")
        terms = {"ce": (lam[:, 0] * ce).mean()}
        names = self.column_names[1:]
        for m, teacher in enumerate(teachers):
            kd = kd_kl(logits, teacher.logits, self.temperature, reduction="none")
            terms["kd" if len(names) == 1 else f"kd{m}"] = (lam[:, m + 1] * kd).mean()
        return terms

    # -- meta pass: the hooks (the only places that read ctx) -------------------------------
    def is_meta_epoch(self, epoch: int) -> bool:
        return epoch >= self.meta_start and (epoch - self.meta_start) % self.meta_every == 0

    def on_train_epoch_start(self, ctx: MethodContext) -> None:
        epoch = int(ctx.current_epoch)
        if not self.is_meta_epoch(epoch):
            return
        if not self.history:
            self.history.append(self._record(-1))
        self.meta_pass(self._meta_pass_inputs(ctx))
        record = self._record(epoch)
        self.history = [r for r in self.history if r.epoch != epoch] + [record]
        for key, value in report.summary_logs(record, self.column_names).items():
            ctx.log(key, value, on_step=False, on_epoch=True)
        if self.plot and ctx.is_global_zero:
            self._write_plot(Path(ctx.run_dir) / RUN_PLOT)

    def _meta_pass_inputs(self, ctx: MethodContext) -> MetaPassInputs:
        world, rank = int(ctx.world_size), int(ctx.global_rank)

        def meta_batches() -> list[dict[str, Tensor]]:
            meta = ctx.examples("meta")
            return [{k: v[pos] for k, v in meta.items()}
                    for pos in torch.arange(len(meta["target"])).split(256)]

        def teacher_logits(batch: dict[str, Tensor]) -> Tensor:
            return torch.stack([o.logits.to(work_dtype(o.logits))
                                for o in ctx.clean_train_teacher_outputs(batch)])

        return MetaPassInputs(
            student=ctx.student, device=ctx.device, lr=float(ctx.current_lr),
            epoch=int(ctx.current_epoch), seed=int(ctx.seed),
            batch_size=int(ctx.batch_size) * world, chunk_base=int(ctx.batch_size),
            rank=rank, world=world, n_train=int(ctx.train_size),
            train_batch=partial(ctx.examples, "train"), meta_batches=meta_batches,
            teacher_logits=teacher_logits, precision=ctx.precision_context)

    # -- meta pass: the work ---------------------------------------------------------------
    def meta_pass(self, run: MetaPassInputs) -> None:
        """Update the rows of this rank's chunks, then merge the tables across ranks."""
        student = run.student
        _, head = find_classifier(student)
        num_classes = int(head.weight.shape[0])
        dtype = work_dtype(head.weight)
        chunk_size = self.chunk_batches * run.chunk_base
        step, factor = simulated_step(self.step_scale, run.lr, run.batch_size, num_classes)
        self.peak_lr.fill_(max(float(self.peak_lr), run.lr))
        rate = (self.meta_lr * factor if self.row_update == "raw"
                else self.row_step * run.lr / max(float(self.peak_lr), 1e-12))
        with eval_mode(student):
            with torch.no_grad(), run.precision():
                meta = self._meta_split(run, student, head)
            updated = torch.zeros_like(self.mixing_weights[:, 0], dtype=torch.bool)
            # Loss weights are c_j l_ij; c (the column scales) stays fixed during the pass.
            scales = self.column_scales.to(dtype) if self.column_scales.numel() else None
            scale_grad = torch.zeros(self.mixing_weights.shape[1], device=run.device, dtype=dtype)
            for chunk_id, positions in pass_chunks(run.n_train, chunk_size, run.seed,
                                                   run.epoch, run.rank, run.world):
                chunk = run.train_batch(positions)
                with torch.no_grad(), run.precision():
                    teacher_logits = run.teacher_logits(chunk).to(dtype)
                    h = (penultimate_and_logits(student, chunk["input"])[0].to(dtype)
                         if self.lookahead == "last_layer" else None)
                pick = meta_pick(len(meta["target"]), self.meta_batch_size, run.seed,
                                 run.epoch, chunk_id).to(run.device)
                idx = chunk["index"]
                lam = self.mixing_weights[idx].to(dtype)
                for inner in range(self.inner_steps):
                    weights = lam if scales is None else lam * scales
                    if self.lookahead == "full":  # the exact step: no kernel to choose
                        _, grad = full_lookahead_meta_grad(
                            student, weights, chunk["input"], chunk["target"], teacher_logits,
                            meta["input"][pick], meta["target"][pick], step, self.temperature)
                        if self.rebalance and inner == 0:
                            scale_grad += factor * (lam * grad).sum(0)
                    else:
                        args = (h, chunk["target"], teacher_logits, head.weight.to(dtype),
                                None if head.bias is None else head.bias.to(dtype),
                                meta["h"][pick], meta["target"][pick], step, self.temperature)
                        _, grad = last_layer_meta_grad(weights, *args, kernel=self.kernel,
                                                       kernel_scale=self.kernel_scale)
                        if self.rebalance and inner == 0:
                            raw = (grad if self.kernel == "raw"
                                   else last_layer_meta_grad(weights, *args)[1])
                            # dL/dc_j = sum_i l_ij dL/d(c_j l_ij), from the exact kernel
                            scale_grad += factor * (lam * raw).sum(0)
                    if scales is not None:
                        grad = grad * scales  # d/dl_ij of the loss weights c_j l_ij
                    lam = constrained_step(lam, normalized_grad(grad, self.row_update), rate,
                                           self.combination, self.clamp_min, self.clamp_max)
                self.mixing_weights[idx] = lam.to(self.mixing_weights.dtype)
                updated[idx] = True
            sync_rows(self.mixing_weights, updated)
            if self.rebalance:
                # Summed over every chunk of every rank: independent of the number of ranks.
                scale_grad = sync_sum(scale_grad).to(self.column_scales.device) / run.n_train
                step = self.rebalance * self.inner_steps * self.meta_lr
                self.column_scales.copy_((self.column_scales - step * scale_grad).clamp(
                    self.clamp_min, self.scale_max))

    def _meta_split(self, run: MetaPassInputs, student: nn.Module, head: nn.Linear) -> dict:
        """The clean meta split on the device: targets and features (or inputs for full)."""
        batches = run.meta_batches()
        if self.lookahead == "last_layer":
            key, parts = "h", [penultimate_and_logits(student, b["input"])[0] for b in batches]
        else:
            key, parts = "input", [b["input"] for b in batches]
        return {"target": torch.cat([b["target"] for b in batches]), key: torch.cat(parts)}

    # -- reporting -------------------------------------------------------------------------
    def _record(self, epoch: int) -> report.PassRecord:
        return report.summarise(epoch, self.mixing_weights, self._noise_mask,
                                self.column_scales if self.rebalance else None)

    def _write_plot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        bounds = (self.clamp_min, self.clamp_max) if self.combination == "free" else (0.0, 1.0)
        plot_mixing_history(self.history, self.mixing_weights.detach().cpu(), self._noise_mask,
                            self.column_names, path, bounds)

    def results(self) -> dict[str, Any]:
        extra = {key: getattr(self, key) for key in (
            "combination", "lookahead", "step_scale", "kernel", "kernel_scale", "rebalance",
            "paper", "row_update", "row_step")}
        return {"mixing": report.mixing_results(self.history, self._record(-1), self.column_names,
                                                extra)}
