"""ALM-KD: adaptive loss mixing, per-example weights meta-learned on clean data.

Sivasubramanian, Shenoy, Prathosh AP, Ramakrishnan, "ALM-KD: Knowledge Distillation with
noisy labels via adaptive loss mixing", arXiv 2202.03250 (later "Adaptive Mixing of
Auxiliary Losses in Supervised Learning", AAAI 2023).

Student loss with K teachers; every training example i has its own mixing weights
lambda_i = (l_i0, l_i1 .. l_iK), a row of the table ``mixing_weights`` (N_train, K+1):

    L = mean_i [ l_i0 CE(s_i, y~_i) + sum_m l_im T^2 KL( softmax(t_m,i / T) || softmax(s_i / T) ) ]

y~ are the (possibly noisy) training labels, T = 4. Initial rows: teacher columns 0.9,
label column 1 - max(teacher columns) = 0.1 (convex mode: label 0.1, each teacher 0.9 / K).

Meta pass (every ``meta_every`` epochs from ``meta_start``, at the start of the epoch). The
train split is walked in chunks B of ``chunk_batches`` batches. With the student in eval mode,
per-example gradients of each loss term l_ij w.r.t. the logits o_i = W h_i + b are, in
closed form,

    g_i0 = softmax(o_i) - onehot(y~_i)                        (CE)
    g_im = T (softmax(o_i / T) - softmax(t_m,i / T))          (T^2 KL)

and of the last layer: dl_ij/dW = g_ij h_i^T, dl_ij/db = g_ij. One SGD step of the last
layer (step size eta = the student's current learning rate) on the chunk's mixed loss,

    W'(lambda) = W - eta/|B| sum_i (sum_j l_ij g_ij) h_i^T
    b'(lambda) = b - eta/|B| sum_i (sum_j l_ij g_ij)

is scored on a clean meta batch V (``meta_batch_size`` examples of the meta split):

    L_meta(lambda) = mean_{v in V} CE(W'(lambda) h_v + b'(lambda), y_v)

and the chunk's rows move against its gradient, ``inner_steps`` times:

    lambda_B <- P( lambda_B - meta_lr * dL_meta / dlambda_B )

P clamps to [clamp_min, clamp_max] (``combination: free``, the authors' final code) or
projects each row onto the probability simplex (``combination: convex``, the abstract).
``lookahead: full`` replaces the last-layer step by one SGD step of the whole student,
theta'(lambda) = theta - eta grad_theta L_B(lambda), differentiated through with autograd
(exact, costlier; BN in eval mode so the lookahead never touches running statistics).
The simulated step is plain SGD (no momentum or weight decay), as in the paper.

The table is module state (a buffer): saved in checkpoints, restored on resume. Under DDP
every rank walks its own shard of the train split and :func:`sync_rows` merges the updated
rows so all ranks hold the same table.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from ..models.features import find_classifier
from .base import Method, Outputs, kd_kl

COMBINATIONS = ("free", "convex")
LOOKAHEADS = ("last_layer", "full")
# Summary statistics of a weight column kept per meta pass (history, logs, plot).
GROUPS = ("all", "clean", "noisy")
STATS = ("mean", "std", "q05", "q25", "q50", "q75", "q95")
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# -- loss terms, per example (dtype preserved: the tests run them in float64) ----------------


def per_example_terms(logits: Tensor, target: Tensor, teacher_logits: Tensor,
                      temperature: float) -> Tensor:
    """(n, K+1): CE_i and T^2 KL(softmax(t_m,i/T) || softmax(s_i/T)) for each teacher m."""
    t = float(temperature)
    ce = F.cross_entropy(logits, target, reduction="none")
    log_p_s = F.log_softmax(logits / t, dim=-1)  # (n, C)
    log_p_t = F.log_softmax(teacher_logits / t, dim=-1)  # (K, n, C)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1) * t * t  # (K, n)
    return torch.cat([ce[:, None], kl.T], dim=1)


def term_logit_grads(logits: Tensor, target: Tensor, teacher_logits: Tensor,
                     temperature: float) -> Tensor:
    """(K+1, n, C): d(loss term j of example i) / d(logits of example i), in closed form."""
    t = float(temperature)
    onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    g_ce = torch.softmax(logits, dim=-1) - onehot
    g_kd = t * (torch.softmax(logits / t, dim=-1) - torch.softmax(teacher_logits / t, dim=-1))
    return torch.cat([g_ce[None], g_kd], dim=0)


# -- meta-gradients ------------------------------------------------------------------------


def last_layer_meta_grad(lam: Tensor, h: Tensor, target: Tensor, teacher_logits: Tensor,
                         weight: Tensor, bias: Tensor | None, h_meta: Tensor,
                         target_meta: Tensor, lr: float,
                         temperature: float) -> tuple[Tensor, Tensor]:
    """(meta loss, dL_meta/dlambda) for one simulated SGD step of the last layer.

    ``lam`` (n, K+1), ``h`` (n, d) penultimate features of the chunk, ``teacher_logits``
    (K, n, C), ``weight`` (C, d), ``bias`` (C,) or None, ``h_meta`` (m, d) meta features.
    Per-example gradients are closed-form; autograd then only differentiates the small
    graph lambda -> stepped layer -> meta CE, which is exact.
    """
    weight, h, h_meta = weight.detach(), h.detach(), h_meta.detach()
    logits = h @ weight.T + (0 if bias is None else bias.detach())
    g = term_logit_grads(logits, target, teacher_logits.detach(), temperature)
    with torch.enable_grad():
        lam = lam.detach().requires_grad_(True)
        mixed = torch.einsum("nk,knc->nc", lam, g)  # d(mixed loss of i)/d(logits of i)
        n = h.shape[0]
        stepped_w = weight - lr * (mixed.T @ h) / n
        meta_logits = h_meta @ stepped_w.T
        if bias is not None:
            meta_logits = meta_logits + (bias.detach() - lr * mixed.sum(0) / n)
        meta_loss = F.cross_entropy(meta_logits, target_meta)
        (grad,) = torch.autograd.grad(meta_loss, lam)
    return meta_loss.detach(), grad


def full_lookahead_meta_grad(model: nn.Module, lam: Tensor, x: Tensor, target: Tensor,
                             teacher_logits: Tensor, x_meta: Tensor, target_meta: Tensor,
                             lr: float, temperature: float) -> tuple[Tensor, Tensor]:
    """(meta loss, dL_meta/dlambda) for one simulated SGD step of the whole student.

    theta' = theta - lr * grad_theta mean_i sum_j l_ij l_ij(theta), evaluated functionally
    (``torch.func.functional_call``) and differentiated with ``create_graph=True``. The
    model runs in eval mode: BN uses and never updates its running statistics.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            names = [n for n, p in model.named_parameters() if p.requires_grad]
            params = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            lam = lam.detach().requires_grad_(True)
            logits = functional_call(model, (params, buffers), (x,))
            terms = per_example_terms(logits, target, teacher_logits.detach(), temperature)
            loss = (lam * terms).sum(1).mean()
            grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True,
                                        allow_unused=True)
            stepped = dict(params)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    stepped[n] = params[n] - lr * g
            meta_logits = functional_call(model, (stepped, buffers), (x_meta,))
            meta_loss = F.cross_entropy(meta_logits, target_meta)
            (grad,) = torch.autograd.grad(meta_loss, lam)
    finally:
        model.train(was_training)
    return meta_loss.detach(), grad


# -- constraints on the rows ---------------------------------------------------------------


def project_simplex(rows: Tensor) -> Tensor:
    """Euclidean projection of each row onto {w : w >= 0, sum w = 1} (sort-based)."""
    u, _ = rows.sort(dim=1, descending=True)
    cumsum = u.cumsum(1) - 1.0
    k = torch.arange(1, rows.shape[1] + 1, device=rows.device, dtype=rows.dtype)
    support = (u - cumsum / k) > 0  # true on a prefix of the sorted row
    rho = support.sum(1, keepdim=True).clamp_min(1)
    theta = cumsum.gather(1, rho - 1) / rho.to(rows.dtype)
    return (rows - theta).clamp_min(0.0)


def initial_weights(n: int, k: int, teacher_weight: float, combination: str) -> Tensor:
    """Rows (1 - w, w, .., w) (free) or (1 - w, w/K, .., w/K) (convex) for every example."""
    table = torch.empty(n, k + 1)
    per_teacher = teacher_weight / k if combination == "convex" else teacher_weight
    table[:, 1:] = per_teacher
    table[:, 0] = 1.0 - (teacher_weight if combination == "convex" else per_teacher)
    return table


# -- DDP -----------------------------------------------------------------------------------


def sync_rows(table: Tensor, updated: Tensor) -> Tensor:
    """Give every rank the rows any rank updated (in place; averaged if several did).

    Each rank contributes its updated rows (zeros elsewhere) and a mask; both are summed
    over ranks. A no-op without an initialised process group.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return table
    mask = updated.to(table.device, table.dtype)
    rows = table * mask[:, None]
    dist.all_reduce(rows, op=dist.ReduceOp.SUM)
    dist.all_reduce(mask, op=dist.ReduceOp.SUM)
    got = mask > 0
    table[got] = rows[got] / mask[got][:, None]
    return table


# -- summaries -----------------------------------------------------------------------------


def column_summary(table: Tensor, noise_mask: Tensor | None) -> Tensor:
    """(K+1, 3, 7): per column, for all / clean / noisy examples: mean, std, quantiles.

    NaN where a group is empty (no noisy examples without label noise).
    """
    table = table.detach().double().cpu()
    noisy = (torch.zeros(len(table), dtype=torch.bool) if noise_mask is None
             else noise_mask.cpu().bool())
    out = torch.full((table.shape[1], len(GROUPS), len(STATS)), float("nan"), dtype=torch.float64)
    q = torch.tensor(_QUANTILES, dtype=torch.float64)
    for g, rows in enumerate((torch.ones_like(noisy), ~noisy, noisy)):
        part = table[rows]
        if len(part) == 0:
            continue
        out[:, g, 0] = part.mean(0)
        out[:, g, 1] = part.std(0, correction=0)
        out[:, g, 2:] = torch.quantile(part, q, dim=0).T
    return out


def _nan_to_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


class ALMKD(Method):
    name = "alm_kd"
    description = ("ALM-KD: per-example label/teacher loss weights meta-learned on the clean "
                   "meta split (one-step lookahead)")

    def __init__(self, temperature: float = 4.0, combination: str = "free",
                 lookahead: str = "last_layer", meta_every: int = 10, meta_start: int = 10,
                 meta_lr: float = 1500.0, inner_steps: int = 5, chunk_batches: int = 3,
                 meta_batch_size: int = 1000, init_teacher_weight: float = 0.9,
                 clamp_min: float = 1e-7, clamp_max: float = 2.0, plot: bool = True):
        super().__init__()
        if combination not in COMBINATIONS:
            raise ConfigError(f"method.combination must be one of {COMBINATIONS}, "
                              f"got {combination!r}")
        if lookahead not in LOOKAHEADS:
            raise ConfigError(f"method.lookahead must be one of {LOOKAHEADS}, got {lookahead!r}")
        if int(meta_every) < 1 or int(inner_steps) < 0 or int(chunk_batches) < 1:
            raise ConfigError("method.meta_every and method.chunk_batches must be >= 1, "
                              "method.inner_steps >= 0")
        if not float(clamp_min) <= float(clamp_max):
            raise ConfigError(f"method.clamp_min {clamp_min} > method.clamp_max {clamp_max}")
        self.temperature = float(temperature)
        self.combination = combination
        self.lookahead = lookahead
        self.meta_every = int(meta_every)
        self.meta_start = int(meta_start)
        self.meta_lr = float(meta_lr)
        self.inner_steps = int(inner_steps)
        self.chunk_batches = int(chunk_batches)
        self.meta_batch_size = int(meta_batch_size)
        self.init_teacher_weight = float(init_teacher_weight)
        self.clamp_min = float(clamp_min)
        self.clamp_max = float(clamp_max)
        self.plot = bool(plot)
        # (N_train, K+1); sized in setup() once the data and the teachers are known.
        self.register_buffer("mixing_weights", torch.zeros(0, 0))
        # One entry per meta pass: (epoch, column_summary); epoch -1 = initial weights.
        self.history: list[tuple[int, Tensor]] = []
        self._noise_mask: Tensor | None = None

    # -- state -----------------------------------------------------------------------------
    @property
    def num_teachers(self) -> int:
        return max(self.mixing_weights.shape[1] - 1, 0)

    @property
    def column_names(self) -> list[str]:
        k = self.num_teachers
        return ["label"] + (["teacher"] if k == 1 else [f"teacher{m}" for m in range(k)])

    def setup(self, ctx: Any) -> None:
        k = len(ctx.teachers)
        if k == 0:
            raise ConfigError("method alm_kd needs at least one teacher")
        n = int(ctx.train_size)
        self._noise_mask = ctx.noise_mask
        if tuple(self.mixing_weights.shape) == (n, k + 1):
            return  # already sized (later stages, or restored)
        self.mixing_weights = initial_weights(n, k, self.init_teacher_weight,
                                              self.combination).to(self.mixing_weights.device)

    def get_extra_state(self) -> Tensor:
        """The meta-pass history as one float tensor (checkpoints stay tensors-only)."""
        if not self.history:
            return torch.zeros(0)
        return torch.stack([torch.cat([torch.tensor([float(e)], dtype=torch.float64),
                                       s.flatten()]) for e, s in self.history])

    def set_extra_state(self, state: Tensor) -> None:
        # Merge by epoch: restoring a best-epoch checkpoint for testing keeps the passes
        # seen after it; a fresh process resuming gets the whole record back.
        if state.numel() == 0:
            return
        shape = (-1, len(GROUPS), len(STATS))
        loaded = {int(row[0]): row[1:].double().reshape(shape) for row in state}
        merged = dict(loaded) | dict(self.history)
        self.history = sorted(merged.items(), key=lambda item: item[0])

    # -- training loss ---------------------------------------------------------------------
    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        if len(teachers) != self.num_teachers:
            raise ConfigError(f"alm_kd's weight table has {self.num_teachers} teacher columns "
                              f"but {len(teachers)} teachers were given")
        lam = self.mixing_weights[batch["index"]].float()
        logits = student.logits.float()
        ce = F.cross_entropy(logits, batch["target"], reduction="none")
        terms = {"ce": (lam[:, 0] * ce).mean()}
        names = self.column_names[1:]
        for m, teacher in enumerate(teachers):
            kd = kd_kl(logits, teacher.logits, self.temperature, reduction="none")
            terms["kd" if len(names) == 1 else f"kd{m}"] = (lam[:, m + 1] * kd).mean()
        return terms

    # -- meta pass -------------------------------------------------------------------------
    def is_meta_epoch(self, epoch: int) -> bool:
        return epoch >= self.meta_start and (epoch - self.meta_start) % self.meta_every == 0

    def on_train_epoch_start(self, ctx: Any) -> None:
        epoch = int(ctx.current_epoch)
        if not self.is_meta_epoch(epoch):
            return
        if not self.history:
            self.history.append((-1, column_summary(self.mixing_weights, self._noise_mask)))
        self.meta_pass(ctx)
        summary = column_summary(self.mixing_weights, self._noise_mask)
        self.history = [h for h in self.history if h[0] != epoch] + [(epoch, summary)]
        self._log_summary(ctx, summary)
        if self.plot and ctx.is_global_zero:
            self._write_plot(Path(ctx.run_dir) / "alm_mixing_weights.png")

    def constrain(self, rows: Tensor) -> Tensor:
        if self.combination == "convex":
            return project_simplex(rows)
        return rows.clamp(self.clamp_min, self.clamp_max)

    def meta_pass(self, ctx: Any) -> None:
        """Update the rows of every train example this rank sees, then merge across ranks."""
        student = ctx.student
        device = ctx.device
        lr = float(ctx.current_lr)
        _, head = find_classifier(student)
        was_training = student.training
        student.eval()
        try:
            with ctx.precision_context():
                meta = self._meta_split(ctx, student, head)
            gen = torch.Generator().manual_seed(int(ctx.seed) * 1_000_003 + int(ctx.current_epoch))
            updated = torch.zeros(len(self.mixing_weights), dtype=torch.bool,
                                  device=self.mixing_weights.device)
            for chunk in self._chunks(ctx):
                idx = chunk["index"]
                with torch.no_grad(), ctx.precision_context():
                    teacher_logits = torch.stack(
                        [o.logits.float() for o in ctx.clean_train_teacher_outputs(chunk)])
                    h = (_penultimate(student, head, chunk["input"])
                         if self.lookahead == "last_layer" else None)
                pick = self._meta_pick(len(meta["target"]), gen, device)
                lam = self.mixing_weights[idx].float()
                for _ in range(self.inner_steps):
                    if self.lookahead == "last_layer":
                        _, grad = last_layer_meta_grad(
                            lam, h, chunk["target"], teacher_logits, head.weight.float(),
                            None if head.bias is None else head.bias.float(),
                            meta["h"][pick], meta["target"][pick], lr, self.temperature)
                    else:
                        _, grad = full_lookahead_meta_grad(
                            student, lam, chunk["input"], chunk["target"], teacher_logits,
                            meta["input"][pick], meta["target"][pick], lr, self.temperature)
                    lam = self.constrain(lam - self.meta_lr * grad)
                self.mixing_weights[idx] = lam.to(self.mixing_weights.dtype)
                updated[idx] = True
            sync_rows(self.mixing_weights, updated)
        finally:
            student.train(was_training)

    def _chunks(self, ctx: Any):
        """The train split in order (this rank's shard), ``chunk_batches`` batches at a time."""
        shard = torch.arange(int(ctx.train_size))[ctx.global_rank::ctx.world_size]
        for idx in shard.split(int(ctx.batch_size) * self.chunk_batches):
            yield ctx.examples("train", idx)

    def _meta_split(self, ctx: Any, student: nn.Module, head: nn.Linear) -> dict:
        """The clean meta split on the device: targets and features (or inputs for full)."""
        meta = ctx.examples("meta")
        out: dict[str, list[Tensor]] = {"target": [], "h": [], "input": []}
        for pos in torch.arange(len(meta["target"])).split(256):
            batch = {k: v[pos] for k, v in meta.items()}
            out["target"].append(batch["target"])
            if self.lookahead == "last_layer":
                with torch.no_grad():
                    out["h"].append(_penultimate(student, head, batch["input"]))
            else:
                out["input"].append(batch["input"])
        return {k: torch.cat(v) for k, v in out.items() if v}

    def _meta_pick(self, n_meta: int, gen: torch.Generator, device) -> Tensor:
        if n_meta <= self.meta_batch_size:
            return torch.arange(n_meta, device=device)
        return torch.randperm(n_meta, generator=gen)[: self.meta_batch_size].to(device)

    # -- reporting -------------------------------------------------------------------------
    def _log_summary(self, ctx: Any, summary: Tensor) -> None:
        values = {}
        for j, col in enumerate(self.column_names):
            for g, group in enumerate(GROUPS):
                for s, stat in enumerate(STATS[:2]):
                    v = float(summary[j, g, s])
                    if not math.isnan(v):
                        key = f"alm/{col}_{stat}" if group == "all" else f"alm/{col}_{group}_{stat}"
                        values[key] = v
        for key, v in values.items():
            ctx.log(key, v, on_step=False, on_epoch=True)

    def _write_plot(self, path: Path) -> None:
        from .alm_kd_plots import plot_mixing_history

        path.parent.mkdir(parents=True, exist_ok=True)
        plot_mixing_history(self.history, self.mixing_weights.detach().cpu(), self._noise_mask,
                            self.column_names, path)

    def results(self) -> dict[str, Any]:
        passes = [s for e, s in self.history if e >= 0]
        # The last pass describes the final table (the module may since have been reset to
        # the best-on-val checkpoint for testing); without a pass, the table as it is.
        summary = passes[-1] if passes else column_summary(self.mixing_weights, self._noise_mask)
        if summary.shape[0] == 0:
            return {"mixing": {"meta_passes": 0}}
        teacher = summary[1:, :, 0].mean(0)  # mean over teacher columns, per group
        mixing = {
            "label_weight_clean": _nan_to_none(summary[0, 1, 0]),
            "label_weight_noisy": _nan_to_none(summary[0, 2, 0]),
            "teacher_weight_clean": _nan_to_none(teacher[1]),
            "teacher_weight_noisy": _nan_to_none(teacher[2]),
            "label_weight_mean": _nan_to_none(summary[0, 0, 0]),
            "meta_passes": len(passes),
            "combination": self.combination,
            "lookahead": self.lookahead,
        }
        if self.num_teachers > 1:
            mixing["teacher_weights_clean"] = [_nan_to_none(v) for v in summary[1:, 1, 0]]
            mixing["teacher_weights_noisy"] = [_nan_to_none(v) for v in summary[1:, 2, 0]]
        return {"mixing": mixing}


def _penultimate(model: nn.Module, head: nn.Linear, x: Tensor) -> Tensor:
    """The input of the final linear layer, taken with a forward pre-hook."""
    captured: list[Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return captured[0].float()
