"""TGeo-KD: a per-example fusion ratio from the trilateral geometry of student, teacher and
label, learned bilevel on clean data (Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More
From Teacher: Exploiting Trilateral Geometry for Knowledge Distillation", ICLR 2024,
arXiv 2312.15112). What the paper and the released code say, kdlab's choices where they are
silent, DDP, resume and reporting: docs/methods.md.

For a training example i with student logits s_i, teacher logits t_i and (possibly noisy)
label y_i:

    L = mean_i [ alpha_i T^2 KL( softmax(t_i / T) || softmax(s_i / T) )
                 + (1 - alpha_i) CE(s_i, y_i) ]                  (logged as [kd] and [ce])

    alpha_i = sigmoid( MLP( x_i ) ),   MLP: 9C -> 32 -> 16 -> 1, LeakyReLU (slope 0.01)

    x_i = [ S, T, G, Tbar, (Tbar - S)^2, (G - S)^2, (T - S)^2, (T - G)^2, (Tbar - G)^2 ]

(9C features, squares elementwise) with S = softmax(s_i), T = softmax(t_i) (temperature 1;
T = 4 is only the KD term's), G = onehot(y_i) and Tbar = Tbar_{y_i}, the teacher's mean
softmax over the training examples labelled y_i (the training label, as G; computed once,
in ``on_fit_start``, into the buffer ``class_means``; uniform for a label no example has).
alpha has no graph: only the two terms train the student; neither the teacher nor the MLP
gets a gradient from them. ``released_double_softmax: true``: CE(softmax(s_i), y_i).

The controller is trained bilevel, with a real hypergradient: the MLP's parameters phi are
the leaves of the one-step lookahead of :mod:`.lookahead` with the loss weights
lambda_i = (1 - alpha_i(phi), alpha_i(phi)):

    theta'(phi) = theta - lr_t grad_theta mean_{i in B} [ alpha_i(phi) T^2 KL_i(theta)
                                                          + (1 - alpha_i(phi)) CE_i(theta) ]
    L_meta(phi) = mean_{v in V} CE( f(x_v; theta'(phi)), y_v )       (clean meta batch V)
    phi <- Adam( phi, dL_meta/dphi / lr_t )

after every ``meta_interval``-th optimiser step of the student, B the batch it just trained
on, V ``meta_batch_size`` meta examples drawn from (seed, step, rank), lr_t the student's
current lr (dividing by it keeps the scale through the schedule). ``lookahead:
last_layer`` steps the final linear layer (``kernel: raw``: exactly), ``full`` all of it.

The MLP (``controller``, ``requires_grad=False``: never in the student's optimiser nor on
its evaluation path) is built in ``setup`` from (seed, C), its output bias
logit(``init_alpha``) (0.9: training starts as kdlab's KD). Its optimiser is
``torch.optim.Adam``, with its state in the buffers ``controller_exp_avg``,
``controller_exp_avg_sq`` and ``controller_steps`` (:meth:`TGeoKD.controller_step`); under
DDP the ranks average their hypergradients before the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from ..models.features import find_classifier
from .alm_kd_plots import LABEL_WEIGHTS
from .alm_kd_report import ratio_results
from .base import (
    Method,
    Outputs,
    StateBuffer,
    StateSizes,
    gather_from_ranks,
    kd_kl,
    require_teachers,
    step_with_flat_state,
)
from .lookahead import (
    Kernel,
    Lookahead,
    check_kernel_scale,
    eval_mode,
    lookahead_meta_loss,
    meta_pick,
    penultimate_and_logits,
)

FEATURE_BLOCKS = ("S", "T", "G", "Tbar", "(Tbar-S)^2", "(G-S)^2", "(T-S)^2", "(T-G)^2",
                  "(Tbar-G)^2")
HIDDEN = (32, 16)


# -- the features and the controller ------------------------------------------------------


def geometry_features(student_probs: Tensor, teacher_probs: Tensor, target: Tensor,
                      class_means: Tensor) -> Tensor:
    """(n, 9C): [S, T, G, Tbar_y, (Tbar-S)^2, (G-S)^2, (T-S)^2, (T-G)^2, (Tbar-G)^2].

    ``student_probs``, ``teacher_probs`` (n, C) probabilities, ``target`` (n,) labels,
    ``class_means`` (C, C) the teacher's mean prediction per label. Dtype of the student
    probabilities."""
    s = student_probs
    t = teacher_probs.to(s.dtype)
    g = F.one_hot(target, s.shape[-1]).to(s.dtype)
    tbar = class_means.to(s.dtype)[target]
    return torch.cat([s, t, g, tbar, (tbar - s) ** 2, (g - s) ** 2, (t - s) ** 2,
                      (t - g) ** 2, (tbar - g) ** 2], dim=-1)


def teacher_class_means(teacher_probs: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) float32: row c = the mean of ``teacher_probs`` over the rows labelled c
    (accumulated in float64); uniform for a label with no row."""
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64,
                       device=teacher_probs.device)
    sums.index_add_(0, labels, teacher_probs.double())
    counts = torch.bincount(labels, minlength=num_classes).to(sums)
    means = sums / counts.clamp_min(1)[:, None]
    means[counts == 0] = 1.0 / num_classes
    return means.float()


def make_controller(num_classes: int, init_alpha: float | None, seed: int) -> nn.Sequential:
    """The MLP 9C -> 32 -> 16 -> 1 (LeakyReLU), PyTorch's default initialisation drawn from
    ``seed`` (the same on every rank), output bias logit(init_alpha); frozen
    (``requires_grad=False``: it is trained only by the meta step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = nn.Sequential(nn.Linear(len(FEATURE_BLOCKS) * num_classes, HIDDEN[0]),
                            nn.LeakyReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.LeakyReLU(),
                            nn.Linear(HIDDEN[1], 1))
    if init_alpha is not None:
        with torch.no_grad():
            net[-1].bias.fill_(math.log(init_alpha / (1.0 - init_alpha)))
    return net.requires_grad_(False)


def fusion_ratio(controller: nn.Module, features: Tensor,
                 params: dict[str, Tensor] | None = None) -> Tensor:
    """(n,) alpha = sigmoid(MLP(features)); ``params`` replaces the MLP's parameters (the
    leaves of the hypergradient)."""
    out = controller(features) if params is None else functional_call(
        controller, params, (features,))
    return torch.sigmoid(out.squeeze(-1))


# -- the loss, and the hypergradient of the meta loss in the controller's parameters ---------


def tgeo_terms(logits: Tensor, target: Tensor, teacher_logits: Tensor, alpha: Tensor,
               temperature: float, double_softmax: bool = False) -> tuple[Tensor, Tensor]:
    """(kd, ce) batch means of alpha_i T^2 KL(p^T(t_i) || p^T(s_i)) and (1 - alpha_i)
    CE(s_i, y_i) -- with ``double_softmax``, (1 - alpha_i) CE(softmax(s_i), y_i), the
    released code's (its CrossEntropyLoss gets the softmax output). float64 stays float64;
    other dtypes (bf16 logits) go to float32."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits, alpha = logits.to(dtype), alpha.to(dtype)
    kl = kd_kl(logits, teacher_logits.to(dtype), temperature, reduction="none")
    ce = F.cross_entropy(torch.softmax(logits, dim=-1) if double_softmax else logits, target,
                         reduction="none")
    return (alpha * kl).mean(), ((1.0 - alpha) * ce).mean()


def hypergradient(controller: nn.Module, features: Tensor, meta_loss_of
                  ) -> tuple[Tensor, list[Tensor]]:
    """(meta loss, dL_meta/dphi for each of the controller's parameters, in order).

    ``meta_loss_of(lam)`` is the meta loss after the lookahead step on the loss weighted by
    ``lam`` (n, 2) = (1 - alpha, alpha) (label, teacher), differentiable in ``lam``:
    :func:`~.lookahead.lookahead_meta_loss`. The MLP's parameters are the leaves (detached
    copies)."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in controller.named_parameters()}
    with torch.enable_grad():
        alpha = fusion_ratio(controller, features.detach(), leaves)
        meta_loss = meta_loss_of(torch.stack([1.0 - alpha, alpha], dim=1))
        grads = torch.autograd.grad(meta_loss, list(leaves.values()))
    return meta_loss.detach(), list(grads)


# -- the method ----------------------------------------------------------------------------


class TGeoKD(Method):
    name = "tgeo_kd"
    description = ("TGeo-KD: per-example KD/CE fusion ratio from an MLP over student-teacher-"
                   "label geometry, trained bilevel on the clean meta split")
    report_plots = (LABEL_WEIGHTS,)  # its results' "mixing" has ALM-KD's label weights

    def __init__(self, temperature: float = 4.0, lookahead: Lookahead = "last_layer",
                 kernel: Kernel = "raw", kernel_scale: float = 100.0, meta_interval: int = 1,
                 meta_batch_size: int = 128, init_alpha: float | None = 0.9,
                 controller_lr: float = 1e-3, controller_betas: tuple[float, float] = (0.9, 0.999),
                 controller_eps: float = 1e-8, controller_weight_decay: float = 0.0,
                 class_means_batch_size: int = 512, released_double_softmax: bool = False):
        super().__init__()
        check_kernel_scale(kernel_scale)
        if temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {temperature}")
        if meta_interval < 0 or meta_batch_size < 1:
            raise ConfigError("method.meta_interval must be >= 0 (0: never update the "
                              "controller) and method.meta_batch_size >= 1")
        if init_alpha is not None and not 0.0 < init_alpha < 1.0:
            raise ConfigError(f"method.init_alpha must be in (0, 1) or null, got {init_alpha}")
        if not all(0.0 <= b < 1.0 for b in controller_betas) or controller_lr < 0:
            raise ConfigError("method.controller_betas must be two numbers in [0, 1) and "
                              "method.controller_lr >= 0")
        self.controller: nn.Sequential | None = None  # built in setup() (needs C)
        self.register_buffer("class_means", torch.zeros(0, 0))
        self.register_buffer("has_class_means", torch.tensor(False))
        self.register_buffer("controller_exp_avg", torch.zeros(0))
        self.register_buffer("controller_exp_avg_sq", torch.zeros(0))
        self.register_buffer("controller_steps", torch.zeros((), dtype=torch.long))
        # Reporting only: each train example's alpha when last trained on (NaN: not yet).
        self.register_buffer("report_alpha", torch.zeros(0), persistent=False)
        self._means_ready = False
        self._pending: tuple[Tensor, Tensor] | None = None  # (index, alpha) of the last loss
        self._noise_mask: Tensor | None = None  # reporting only
        self._meta_size: int | None = None  # examples in the meta split

    # -- set-up ----------------------------------------------------------------------------
    def check(self, student, teachers) -> None:
        require_teachers(self.name, len(teachers), exactly=1)
        try:
            find_classifier(student)
        except ValueError as e:
            raise ConfigError(f"tgeo_kd's lookahead needs a student with a final linear "
                              f"layer: {e}") from None

    def _build(self, num_classes: int, seed: int, device: torch.device) -> None:
        self.controller = make_controller(num_classes, self.init_alpha, seed).to(device)
        size = sum(p.numel() for p in self.controller.parameters())
        self.controller_exp_avg = torch.zeros(size, device=device)
        self.controller_exp_avg_sq = torch.zeros(size, device=device)
        self.class_means = torch.zeros(num_classes, num_classes, device=device)

    def setup(self, ctx) -> None:
        """Build the controller, its optimiser state and the class-mean buffer (idempotent:
        setup runs for every stage, and before a checkpoint is restored)."""
        self.check(ctx.student, ctx.teachers)
        c = int(ctx.num_classes)
        device = next(ctx.student.parameters()).device
        if self.controller is None or self.class_means.shape != (c, c):
            self._build(c, int(ctx.seed) * 1_000_003 + 4099, device)
            self.has_class_means.fill_(False)
            self._means_ready = False
        n = int(ctx.train_size)
        if self.report_alpha.shape != (n,):
            self.report_alpha = torch.full((n,), float("nan"), device=device)
        self._noise_mask = ctx.noise_mask  # for results() only

    def state_buffers(self, sizes: StateSizes) -> dict[str, StateBuffer]:
        c = sizes.num_classes
        adam = StateBuffer((sum(p.numel() for p in make_controller(c, None, 0).parameters()),),
                           torch.float32, rows="")
        return {"class_means": StateBuffer((c, c), torch.float32, rows="class"),
                "controller_exp_avg": adam, "controller_exp_avg_sq": adam,
                "report_alpha": StateBuffer((sizes.num_examples,), torch.float32)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A method that has not run setup() (e.g. DistillModule.load_from_checkpoint, which
        # leaves out the unbuilt controller's weights) takes the shapes from the checkpoint.
        weight = state_dict.get(prefix + "controller.0.weight")
        if weight is not None and (self.controller is None
                                   or self.controller[0].weight.shape != weight.shape):
            c = weight.shape[1] // len(FEATURE_BLOCKS)
            self._build(c, 0, weight.device)
        for name in ("class_means", "controller_exp_avg", "controller_exp_avg_sq"):
            saved, current = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=current.dtype,
                                                device=current.device))
        self._means_ready = False
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_parameters(self) -> list[nn.Parameter]:
        """None: the controller is trained by its own optimiser, on the meta objective only."""
        return []

    @torch.no_grad()
    def on_fit_start(self, ctx) -> None:
        """Tbar: the teacher's mean prediction per training label, once (kept on resume)."""
        self._meta_size = len(ctx.examples("meta")["target"])
        if self.meta_interval and self._meta_size == 0:
            raise ConfigError("tgeo_kd trains its controller on the clean meta split, which is "
                              "empty: set dataset.meta_fraction > 0 (or method.meta_interval=0)")
        if bool(self.has_class_means):
            self._means_ready = True
            return
        probs, labels = [], []
        for chunk in torch.arange(int(ctx.train_size)).split(self.class_means_batch_size):
            batch = ctx.examples("train", chunk)
            (out,) = ctx.clean_train_teacher_outputs(batch)
            probs.append(torch.softmax(out.logits.float(), dim=-1))
            labels.append(batch["target"].long())
        means = teacher_class_means(torch.cat(probs), torch.cat(labels),
                                    self.class_means.shape[0])
        self.class_means.copy_(means.to(self.class_means.device))
        self.has_class_means.fill_(True)
        self._means_ready = True

    # -- the training loss -----------------------------------------------------------------
    def features(self, logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """The geometry features (float32, or float64 for float64 logits), without a graph."""
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.no_grad():
            return geometry_features(torch.softmax(logits.detach().to(dtype), dim=-1),
                                     torch.softmax(teacher_logits.detach().to(dtype), dim=-1),
                                     target, self.class_means)

    def alpha(self, logits: Tensor, teacher_logits: Tensor, target: Tensor) -> Tensor:
        """(n,) the fusion ratio of these examples (no graph)."""
        if self.controller is None:
            raise RuntimeError("tgeo_kd's controller is not built: setup(ctx) must run first")
        if not self._means_ready:
            self._means_ready = bool(self.has_class_means)
            if not self._means_ready:
                raise RuntimeError("tgeo_kd's class means are not computed: on_fit_start(ctx) "
                                   "must run first")
        feats = self.features(logits, teacher_logits, target)
        with torch.no_grad():
            return fusion_ratio(self.controller, feats.to(self.controller[0].weight.dtype))

    def loss_terms(self, student: Outputs, teachers: list[Outputs], batch):
        require_teachers(self.name, len(teachers), exactly=1)
        logits, teacher_logits = student.logits, teachers[0].logits
        alpha = self.alpha(logits, teacher_logits, batch["target"])
        kd, ce = tgeo_terms(logits, batch["target"], teacher_logits, alpha, self.temperature,
                            self.released_double_softmax)
        if "index" in batch:
            self._pending = (batch["index"], alpha.detach())
        return {"kd": kd, "ce": ce}

    # -- the controller's update -----------------------------------------------------------
    def on_train_batch_end(self, ctx, batch) -> None:
        self._record_alpha(ctx)
        step = int(ctx.global_step)
        if self.meta_interval and step % self.meta_interval == 0:
            self.controller_update(ctx, batch["index"], step)

    @torch.no_grad()
    def _record_alpha(self, ctx) -> None:
        if self._pending is None:
            return
        index, alpha = (gather_from_ranks(ctx, t) for t in self._pending)
        self._pending = None
        self.report_alpha[index.to(self.report_alpha.device)] = alpha.to(self.report_alpha)
        a = alpha.float()
        for name, value in (("mean", a.mean()), ("std", a.std(correction=0))):
            ctx.log(f"tgeo/alpha_{name}", value, on_step=False, on_epoch=True, batch_size=len(a))

    def controller_update(self, ctx, index: Tensor, step: int) -> Tensor:
        """One Adam step of the controller against the lookahead hypergradient of the train
        examples ``index`` (this rank's batch), averaged over ranks. Returns the meta loss."""
        meta_loss, grad = self.local_hypergradient(ctx, index, step)
        if int(ctx.world_size) > 1:  # the same step on every rank
            grad = ctx.all_gather(grad).reshape(-1, grad.numel()).mean(0)
            meta_loss = ctx.all_gather(meta_loss).mean()
        self.controller_step(grad)
        ctx.log("tgeo/meta_loss", meta_loss, on_step=False, on_epoch=True,
                batch_size=len(index))
        return meta_loss

    def controller_step(self, grad: Tensor) -> None:
        """One ``torch.optim.Adam`` step of the controller on the flat gradient ``grad``, its
        state in the buffers (:func:`~.base.step_with_flat_state`)."""
        step_with_flat_state(
            torch.optim.Adam, list(self.controller.parameters()), grad,
            {"exp_avg": self.controller_exp_avg, "exp_avg_sq": self.controller_exp_avg_sq},
            self.controller_steps, lr=self.controller_lr, betas=self.controller_betas,
            eps=self.controller_eps, weight_decay=self.controller_weight_decay)

    def local_hypergradient(self, ctx, index: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(meta loss, flat dL_meta/dphi / lr) of this rank's lookahead: the student's SGD
        step (lr = its current one) on the train examples ``index``, scored on a meta batch
        drawn from (seed, step, rank). The student runs in eval mode and is left as it was."""
        student = ctx.student
        chunk = ctx.examples("train", index.cpu())
        if self._meta_size is None:
            self._meta_size = len(ctx.examples("meta")["target"])
        pick = meta_pick(self._meta_size, self.meta_batch_size, int(ctx.seed), step,
                         int(ctx.global_rank))
        meta = ctx.examples("meta", pick)
        with eval_mode(student):
            with torch.no_grad(), ctx.precision_context():
                (teacher,) = ctx.clean_train_teacher_outputs(chunk)
                h, logits = penultimate_and_logits(student, chunk["input"])
                h_meta = (penultimate_and_logits(student, meta["input"])[0]
                          if self.lookahead == "last_layer" else None)
            dtype = self.controller_exp_avg.dtype
            t_logits = teacher.logits.to(dtype)
            feats = self.features(logits.to(dtype), t_logits, chunk["target"])
            lr = max(float(ctx.current_lr), 1e-12)  # lr 0 (end of a schedule): first order
            meta_loss_of = lookahead_meta_loss(
                self.lookahead, student, chunk["input"], h.to(dtype), chunk["target"],
                t_logits[None], meta["input"], None if h_meta is None else h_meta.to(dtype),
                meta["target"], lr / len(chunk["target"]),  # per example: lr x the batch mean
                self.temperature, self.kernel, self.kernel_scale)
            meta_loss, grads = hypergradient(self.controller, feats, meta_loss_of)
        return meta_loss, torch.cat([g.reshape(-1) for g in grads]) / lr

    # -- reporting -------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        return {"mixing": ratio_results(self.report_alpha, self._noise_mask,
                                        {"lookahead": self.lookahead,
                                         "init_alpha": self.init_alpha})}
