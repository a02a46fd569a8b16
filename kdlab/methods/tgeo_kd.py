"""TGeo-KD: a per-example fusion ratio from the trilateral geometry of student, teacher and
label, learned bilevel on clean data (Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More
From Teacher: Exploiting Trilateral Geometry for Knowledge Distillation", ICLR 2024,
arXiv 2312.15112).

The loss
--------
For a training example i with student logits s_i, teacher logits t_i and (possibly noisy)
label y_i:

    L = mean_i [ alpha_i T^2 KL( softmax(t_i / T) || softmax(s_i / T) )
                 + (1 - alpha_i) CE(s_i, y_i) ]                  (logged as [kd] and [ce])

    alpha_i = sigmoid( MLP( x_i ) ),   MLP: 9C -> 32 -> 16 -> 1, LeakyReLU (slope 0.01)

with the 9C geometry features of example i (C classes; each block a C-vector, in this order)

    x_i = [ S, T, G, Tbar, (Tbar - S)^2, (G - S)^2, (T - S)^2, (T - G)^2, (Tbar - G)^2 ]

    S    = softmax(s_i)           the student's prediction (temperature 1)
    T    = softmax(t_i)           the teacher's prediction (temperature 1)
    G    = onehot(y_i)            the label
    Tbar = Tbar_{y_i}             the teacher's mean prediction over the training examples
                                  labelled y_i (below)

squares elementwise. S, T and Tbar are probabilities at temperature 1 (both released codes
feed the MLP the plain softmax outputs); the temperature T (default 4) is only the KD term's.
The features are constants for the loss: alpha is computed without a graph, so the student
is trained by the two loss terms only (it cannot lower its loss by moving alpha), the
teacher never gets a gradient (its outputs come without one) and the MLP gets none from the
training loss.

CE(s_i, y_i) = -log softmax(s_i)_y, the cross-entropy of the logits (the usual reading of
the paper's CE term, and kdlab's default). The released tabular code differs here: its
lower-level (training) loss applies ``torch.nn.CrossEntropyLoss`` to the student's *softmax
output* (``src/fusion_ratio_bilevel.py``: ``gt_lower_loss = loss_func(
train_student_pred_prob, ...)`` with ``loss_func = CrossEntropyLoss`` in its ``__main__``;
``train_student_pred_prob`` is the second output of ``Student.forward`` in
``src/network.py``, ``nn.Softmax`` of the logits), so its CE term is
-log softmax(softmax(s_i))_y, a double softmax: it lies in [log(e + C - 1) - 1,
log(e + C - 1)] and its gradient is much weaker than CE's (its upper-level loss, the CE on
the validation split, is computed the same way). ``released_double_softmax: true``
reproduces it in the training loss; the controller's lookahead keeps CE on the logits
either way. The repository's former ``cifar100/`` code (``lib/losses/kd_loss.py``, removed
in a later commit) applied CE to the logits.

Class means Tbar
----------------
Tbar_c = mean of softmax(t(x)) over the training examples whose label is c: computed once,
in ``on_fit_start``, over the whole un-augmented train split (``ctx.examples("train", ..)``,
teacher outputs from the logit cache via ``ctx.clean_train_teacher_outputs``), into the
buffer ``class_means`` (C x C) with ``has_class_means``; every DDP rank computes it from the
whole split, so all hold the same; a resumed run keeps the saved one. "Labelled c" means the
*training* label, noisy when the run has label noise: it is the only label the training
loss has (G is that label too), so Tbar_y answers "what does the teacher predict, on
average, for examples carrying this label"; under symmetric noise below (C - 1) / C it is
still peaked on the true class, and an example whose teacher prediction T is far from
Tbar_y (large (T - Tbar)-type geometry) is one the MLP can learn to treat differently. The
clean labels of the meta split are not used: they are few (10 %), and they are the meta
objective's, which Tbar would otherwise leak into the loss. A class with no training
example gets the uniform distribution (it can never be a training label).

The controller is trained bilevel, with a real hypergradient
------------------------------------------------------------
(The released code computes alpha under ``no_grad`` and its outer loss never depends on the
MLP, so the MLP never moves; its CIFAR-100 variant trains a differently shaped head on the
training loss itself. Neither is reproduced.) The MLP's parameters phi are the leaves of a
one-step lookahead, ALM-KD's machinery (:func:`kdlab.methods.alm_kd.last_layer_meta_loss`,
:func:`~kdlab.methods.alm_kd.full_lookahead_meta_loss`) with the loss weights
lambda_i = (1 - alpha_i(phi), alpha_i(phi)) instead of a per-example table:

    theta'(phi) = theta - lr_t grad_theta mean_{i in B} [ alpha_i(phi) T^2 KL_i(theta)
                                                          + (1 - alpha_i(phi)) CE_i(theta) ]
    L_meta(phi) = mean_{v in V} CE( f(x_v; theta'(phi)), y_v )       (clean meta batch V)
    phi <- Adam( phi, dL_meta/dphi / lr_t )

``lookahead: last_layer`` (default) steps only the student's final linear layer (closed-form
per-example gradients, ALM-KD's ``kernel: raw`` = the exact step; ``centered`` is offered
as ALM-KD defines it); ``full`` steps the whole student functionally (exact second order,
costlier). lr_t is the student's current learning rate, so the simulated step is the plain
SGD step training takes on B (no momentum or weight decay). dL_meta/dphi is linear in lr_t
to first order; it is divided by lr_t so the controller's optimiser sees a quantity whose
scale does not shrink with the schedule (Adam is invariant to a constant scale; this keeps
its eps out of play as lr_t decays). The student runs in eval mode for the lookahead and
is never changed by it.

When the controller updates
---------------------------
After every ``meta_interval``-th optimiser step of the student (default every step), in
``on_train_batch_end``: the lookahead chunk B is the batch the student just trained on
(its un-augmented examples by index, their teacher logits from the cache), V a meta batch
of ``meta_batch_size`` clean examples drawn from (seed, step, rank). This is the online
alternation of bilevel re-weighting (student step with alpha_phi, then a controller step
against the lookahead), rather than ALM-KD's passes every few epochs, because: the
controller is one network shared by all examples, so every batch is a fresh sample for it
and it needs no pass over the data (ALM-KD walks the whole set because each of its table
rows is seen only through its own example); alpha depends on the student's current
predictions, which move every step, so a controller trained at sparse passes would lag the
features it reads; and the last-layer lookahead costs two eval-mode forward passes (the
batch and the meta batch; no teacher forward) per update. ``meta_interval`` > 1 trades
freshness for cost.

The controller's optimiser is Adam (``controller_lr``, ``controller_betas``,
``controller_eps``, ``controller_weight_decay``: torch.optim.Adam's update, L2 added to the
gradient) written out here so that its state is module state: the buffers
``controller_exp_avg``, ``controller_exp_avg_sq`` (flat over the MLP's parameters) and
``controller_steps``. The MLP (``controller``) is a submodule with ``requires_grad=False``:
saved in checkpoints, never in the student's optimiser (``extra_parameters()`` is empty)
and never registered with DDP's gradient reducer (it gets no gradient in the training
backward); the lookahead differentiates functional copies of its parameters. It is never
on the student's evaluation path. It is built in ``setup`` from (seed, C) with PyTorch's
default initialisation and its output bias set to logit(``init_alpha``) (default 0.9:
at the start the loss is kdlab's KD, 0.9 T^2 KL + 0.1 CE, plus the MLP's small per-example
variation; ``init_alpha: null`` keeps the default bias, alpha ~ 0.5, as in the released
code).

DDP: each rank takes the lookahead of its own batch against its own meta batch; the flat
hypergradients are averaged over ranks (``ctx.all_gather``) before the Adam step, so every
rank takes the same step from the same state and all hold the same controller. Resume: the
controller, its Adam state and the class means are in the checkpoint, the meta batches are
functions of (seed, step, rank), and nothing here draws from the global RNG: a resumed run
continues exactly.

Reporting (never read by training): the fusion ratio each training example got the last
time it was trained on (a non-persistent buffer, gathered over ranks), summarised in
``results.json["mixing"]`` as label weight 1 - alpha and teacher weight alpha on the clean
and the noisy examples (the noise mask is read for this only), and the AUROC with which a
low label weight picks out the noisy labels, as ALM-KD reports (the evidence script
compares both); logged per epoch: ``tgeo/alpha_mean``, ``tgeo/alpha_std``,
``tgeo/meta_loss``.

What was verified (details: docs/methods.md)
--------------------------------------------
From the paper's text (its abstract; the body could not be read through the search tools):
a sample-wise fusion ratio learned from intra-sample relations among S, T and G and
inter-sample relations through the teacher's class-average prediction Tbar, by a simple
network trained in a bilevel-optimisation manner. From the released code (read, not
copied): the tabular controller 9C -> 32 -> 16 -> 1 with LeakyReLU and a sigmoid, the nine
feature blocks in this order with squared differences, S and T the temperature-1 softmax,
T^2 KL at T = 1.5, alpha on KL and 1 - alpha on CE. Its ``cifar100/`` folder differs (a
9C -> 128 -> 1 head inside the student over other features, trained by the training loss
itself, class means from the test loader, KD at T = 1) and does not say what produced the
paper's CIFAR table. Not verified: the paper's CIFAR hyperparameters (T, the controller's
optimiser and learning rate, the meta split, the update schedule, the initial ratio);
kdlab's defaults are its own (T = 4 as kdlab's KD, Adam 1e-3, init 0.9).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from ..models.features import find_classifier
from .alm_kd_plots import LABEL_WEIGHTS
from .alm_kd_report import noise_auroc
from .base import Method, Outputs, gather_from_ranks, kd_kl, require_teachers
from .lookahead import (
    KERNELS,
    full_lookahead_meta_loss,
    last_layer_meta_loss,
    meta_pick,
    penultimate_and_logits,
)

LOOKAHEADS = ("last_layer", "full")
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


# -- the loss ------------------------------------------------------------------------------


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


# -- the hypergradient ---------------------------------------------------------------------


def hypergradient(controller: nn.Module, features: Tensor, meta_loss_of
                  ) -> tuple[Tensor, list[Tensor]]:
    """(meta loss, dL_meta/dphi for each of the controller's parameters, in order).

    ``meta_loss_of(lam)`` is the meta loss after the lookahead step on the loss weighted by
    ``lam`` (n, 2) = (1 - alpha, alpha) (label, teacher), differentiable in ``lam``:
    ALM-KD's :func:`last_layer_meta_loss` or :func:`full_lookahead_meta_loss` with their
    other arguments bound. The MLP's parameters are the leaves (detached copies)."""
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

    def __init__(self, temperature: float = 4.0, lookahead: str = "last_layer",
                 kernel: str = "raw", kernel_scale: float = 100.0, meta_interval: int = 1,
                 meta_batch_size: int = 128, init_alpha: float | None = 0.9,
                 controller_lr: float = 1e-3, controller_betas: tuple[float, float] = (0.9, 0.999),
                 controller_eps: float = 1e-8, controller_weight_decay: float = 0.0,
                 class_means_batch_size: int = 512, released_double_softmax: bool = False):
        super().__init__()
        if lookahead not in LOOKAHEADS:
            raise ConfigError(f"method.lookahead must be one of {LOOKAHEADS}, got {lookahead!r}")
        if kernel not in KERNELS:
            raise ConfigError(f"method.kernel must be one of {KERNELS}, got {kernel!r}")
        if float(temperature) <= 0 or float(kernel_scale) <= 0:
            raise ConfigError("method.temperature and method.kernel_scale must be > 0")
        if int(meta_interval) < 0 or int(meta_batch_size) < 1:
            raise ConfigError("method.meta_interval must be >= 0 (0: never update the "
                              "controller) and method.meta_batch_size >= 1")
        if init_alpha is not None and not 0.0 < float(init_alpha) < 1.0:
            raise ConfigError(f"method.init_alpha must be in (0, 1) or null, got {init_alpha}")
        betas = tuple(float(b) for b in controller_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas) or controller_lr < 0:
            raise ConfigError("method.controller_betas must be two numbers in [0, 1) and "
                              "method.controller_lr >= 0")
        self.temperature = float(temperature)
        self.lookahead = lookahead
        self.kernel = kernel
        self.kernel_scale = float(kernel_scale)
        self.meta_interval = int(meta_interval)
        self.meta_batch_size = int(meta_batch_size)
        self.init_alpha = None if init_alpha is None else float(init_alpha)
        self.controller_lr = float(controller_lr)
        self.controller_betas = (betas[0], betas[1])
        self.controller_eps = float(controller_eps)
        self.controller_weight_decay = float(controller_weight_decay)
        self.class_means_batch_size = int(class_means_batch_size)
        self.released_double_softmax = bool(released_double_softmax)
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
        n = len(alpha)
        ctx.log("tgeo/alpha_mean", alpha.float().mean(), on_step=False, on_epoch=True,
                batch_size=n)
        ctx.log("tgeo/alpha_std", alpha.float().std(correction=0), on_step=False,
                on_epoch=True, batch_size=n)

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
        """One ``torch.optim.Adam`` step of the controller on the flat gradient ``grad``. Its
        state is the buffers (module state, so checkpoints and resume carry it): the
        optimiser, made for the step, gets views of ``controller_exp_avg`` /
        ``controller_exp_avg_sq`` as its moments, updates them in place, and takes its step
        count from ``controller_steps``."""
        params = list(self.controller.parameters())
        adam = torch.optim.Adam(params, lr=self.controller_lr, betas=self.controller_betas,
                                eps=self.controller_eps, weight_decay=self.controller_weight_decay)
        offset = 0
        for p in params:
            flat = slice(offset, offset + p.numel())
            p.grad = grad[flat].view_as(p).to(p.dtype)
            adam.state[p] = {"step": torch.tensor(float(self.controller_steps)),
                             "exp_avg": self.controller_exp_avg[flat].view_as(p),
                             "exp_avg_sq": self.controller_exp_avg_sq[flat].view_as(p)}
            offset += p.numel()
        adam.step()
        for p in params:
            p.grad = None
        self.controller_steps += 1

    def local_hypergradient(self, ctx, index: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """(meta loss, flat dL_meta/dphi / lr) of this rank's lookahead: the student's SGD
        step (lr = its current one) on the train examples ``index``, scored on a meta batch
        drawn from (seed, step, rank). The student runs in eval mode and is left as it was."""
        student = ctx.student
        _, head = find_classifier(student)
        chunk = ctx.examples("train", index.cpu())
        if self._meta_size is None:
            self._meta_size = len(ctx.examples("meta")["target"])
        pick = meta_pick(self._meta_size, self.meta_batch_size, int(ctx.seed), step,
                         int(ctx.global_rank))
        meta = ctx.examples("meta", pick)
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad(), ctx.precision_context():
                (teacher,) = ctx.clean_train_teacher_outputs(chunk)
                h, logits = penultimate_and_logits(student, chunk["input"])
                h_meta = (penultimate_and_logits(student, meta["input"])[0]
                          if self.lookahead == "last_layer" else None)
            dtype = self.controller_exp_avg.dtype
            t_logits = teacher.logits.to(dtype)
            feats = self.features(logits.to(dtype), t_logits, chunk["target"])
            lr = max(float(ctx.current_lr), 1e-12)  # lr 0 (end of a schedule): first order
            step_size = lr / len(chunk["target"])  # per example: lr x the batch mean
            if self.lookahead == "last_layer":
                meta_loss_of = partial(
                    _last_layer_loss_of, h=h.to(dtype), target=chunk["target"],
                    teacher_logits=t_logits[None], weight=head.weight.to(dtype),
                    bias=None if head.bias is None else head.bias.to(dtype),
                    h_meta=h_meta.to(dtype), target_meta=meta["target"], step=step_size,
                    temperature=self.temperature, kernel=self.kernel,
                    kernel_scale=self.kernel_scale)
            else:
                meta_loss_of = partial(
                    _full_loss_of, model=student, x=chunk["input"], target=chunk["target"],
                    teacher_logits=t_logits[None], x_meta=meta["input"],
                    target_meta=meta["target"], step=step_size, temperature=self.temperature)
            meta_loss, grads = hypergradient(self.controller, feats, meta_loss_of)
        finally:
            student.train(was_training)
        return meta_loss, torch.cat([g.reshape(-1) for g in grads]) / lr

    # -- reporting -------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        alpha = self.report_alpha.detach().double().cpu()
        seen = ~torch.isnan(alpha)
        out: dict[str, Any] = {"examples": int(seen.sum()), "lookahead": self.lookahead,
                               "init_alpha": self.init_alpha}
        if not bool(seen.any()):
            return {"mixing": out}
        a = alpha[seen]
        out |= {"alpha_mean": float(a.mean()), "alpha_std": float(a.std(correction=0))}
        mask = None if self._noise_mask is None else self._noise_mask.cpu().bool()[seen]
        groups = {"clean": a if mask is None else a[~mask], "noisy": a[:0] if mask is None
                  else a[mask]}
        for group, part in groups.items():
            value = float(part.mean()) if len(part) else float("nan")
            out[f"teacher_weight_{group}"] = value
            out[f"label_weight_{group}"] = 1.0 - value
        out["noise_auroc"] = noise_auroc(1.0 - a, mask)
        return {"mixing": out}


def _last_layer_loss_of(lam: Tensor, **kwargs) -> Tensor:
    return last_layer_meta_loss(lam, **kwargs)


def _full_loss_of(lam: Tensor, **kwargs) -> Tensor:
    model = kwargs.pop("model")
    return full_lookahead_meta_loss(model, lam, **kwargs)
