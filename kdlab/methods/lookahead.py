"""One-step lookahead: how a per-example weighting of the training loss would change a
clean meta loss, through one simulated SGD step of the student. The engine of ALM-KD's meta
pass (:mod:`.alm_kd`: a table of weights per example) and TGeo-KD's controller
(:mod:`.tgeo_kd`: weights from an MLP); it knows neither.

The weighted loss of a chunk B (its examples i, labels y~_i, K teachers m):

    L_B(theta; lambda) = sum_{i in B} [ l_i0 CE(s_i, y~_i)
                                     + sum_m l_im T^2 KL(softmax(t_m,i / T) || softmax(s_i / T)) ]

(:func:`per_example_terms`: the (n, K+1) terms), lambda = (l_ij) any tensor, differentiable
in whatever leaves the caller gives it. One plain SGD step with a per-example step s (no
momentum or weight decay), scored on a clean meta batch V:

    theta'(lambda) = theta - s grad_theta L_B(theta; lambda)
    L_meta(lambda) = mean_{v in V} CE( f(x_v; theta'(lambda)), y_v )

The ``*_meta_loss`` functions return L_meta as a graph in lambda, the ``*_meta_grad`` ones
(L_meta, dL_meta/dlambda) with lambda as the leaf. The student runs in eval mode and is
never changed (BN uses, and never updates, its running statistics).

Last layer (:func:`last_layer_meta_loss`): only the final linear layer o = W h + b steps.
The per-example gradients of each term w.r.t. the logits are, in closed form
(:func:`term_logit_grads`),

    g_i0 = softmax(o_i) - onehot(y~_i)                        (CE)
    g_im = T (softmax(o_i / T) - softmax(t_m,i / T))          (T^2 KL)

and of the layer dl_ij/dW = g_ij h_i^T, dl_ij/db = g_ij, so

    W'(lambda) = W - s sum_{i in B} (sum_j l_ij g_ij) h_i^T,   b'(lambda) = b - s sum_i (..)

The g are constants, so the only graph is lambda -> (W', b') -> meta CE: exact, and cheap
(the features h of the chunk and of V, no second forward). ``kernel``:

* ``raw``: the step above; the meta logits move by -s sum_i (h_i . h_v + 1) <., g_i>.
* ``centered``: the step moves W in the coordinates h - mu (mu the meta batch's mean
  feature) and leaves the class biases b' = b + W mu alone: the kernel is
  (h_i - mu) . (h_v - mu), with zero mean over V for every i, divided by its mean diagonal
  over V, mean_v |h_v - mu|^2, and multiplied by ``kernel_scale`` (dimensionless: the
  architecture's feature scale no longer sets the step). Why: ALM-KD's docstring.

Whole student (:func:`full_lookahead_meta_loss`): theta' for every parameter, evaluated
functionally (``torch.func.functional_call``) with ``create_graph=True``: exact second
order, several times a training step's cost.

The plumbing of a pass over the train split: its chunks (:func:`pass_chunks`) and the meta
batches (:func:`meta_pick`) are drawn from (seed, step, stream) with :func:`pass_generator`,
never from the global RNG, so they are the same on every DDP rank and on resume;
:func:`sync_rows` / :func:`sync_sum` merge what the ranks computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import ConfigError
from ..models.features import PENULTIMATE, FeatureHooks, find_classifier
from .base import kd_kl

# The methods' options: the simulated step of the last layer only or of the whole network,
# and the last-layer step's kernel (the exact one, or centred and normalised).
Lookahead = Literal["last_layer", "full"]
Kernel = Literal["raw", "centered"]
KERNELS = get_args(Kernel)


def check_kernel_scale(kernel_scale: float) -> None:
    """A one-line ConfigError unless the centred kernel's scale is positive."""
    if kernel_scale <= 0:
        raise ConfigError(f"method.kernel_scale must be > 0, got {kernel_scale}")

# -- loss terms, per example (dtype preserved: the tests run them in float64) ----------------


def per_example_terms(logits: Tensor, target: Tensor, teacher_logits: Tensor,
                      temperature: float) -> Tensor:
    """(n, K+1): CE_i and T^2 KL(softmax(t_m,i/T) || softmax(s_i/T)) for each teacher m."""
    ce = F.cross_entropy(logits, target, reduction="none")
    kl = kd_kl(logits, teacher_logits, temperature, reduction="none")  # (K, n)
    return torch.cat([ce[:, None].to(kl.dtype), kl.T], dim=1)


def term_logit_grads(logits: Tensor, target: Tensor, teacher_logits: Tensor,
                     temperature: float) -> Tensor:
    """(K+1, n, C): d(loss term j of example i) / d(logits of example i), in closed form."""
    t = float(temperature)
    onehot = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    g_ce = torch.softmax(logits, dim=-1) - onehot
    g_kd = t * (torch.softmax(logits / t, dim=-1) - torch.softmax(teacher_logits / t, dim=-1))
    return torch.cat([g_ce[None], g_kd], dim=0)


# -- the meta loss after the step, and its gradient ------------------------------------------


def last_layer_meta_loss(lam: Tensor, h: Tensor, target: Tensor, teacher_logits: Tensor,
                         weight: Tensor, bias: Tensor | None, h_meta: Tensor,
                         target_meta: Tensor, step: float, temperature: float,
                         kernel: str = "raw", kernel_scale: float = 1.0) -> Tensor:
    """The meta loss after one simulated SGD step of the last layer, differentiable in
    ``lam`` (whatever its leaves: ALM-KD's table rows, or a network that outputs them).

    ``lam`` (n, K+1), ``h`` (n, d) penultimate features of the chunk, ``teacher_logits``
    (K, n, C), ``weight`` (C, d), ``bias`` (C,) or None, ``h_meta`` (m, d) meta features,
    ``step`` the per-example step s (W' = W - s sum_i (..) h_i^T). ``kernel="centered"``:
    the step moves W in the coordinates h - mu (mu = mean of ``h_meta``) and not the class
    biases, with the centred kernel normalised to mean diagonal ``kernel_scale`` over the
    meta batch. Per-example gradients are closed-form (constants); the only graph is
    lam -> stepped layer -> meta CE, so differentiating it is exact.
    """
    weight, h, h_meta = weight.detach(), h.detach(), h_meta.detach()
    logits = h @ weight.T + (0 if bias is None else bias.detach())
    g = term_logit_grads(logits, target, teacher_logits.detach(), temperature)
    if kernel == "centered":
        mu = h_meta.mean(0)
        hc, hmc = h - mu, h_meta - mu
        norm = (hmc * hmc).sum(1).mean().clamp_min(1e-12)
        hc = hc * (float(kernel_scale) / norm)
        meta_logits0 = h_meta @ weight.T + (0 if bias is None else bias.detach())
    elif kernel != "raw":
        raise ConfigError(f"method.kernel must be one of {KERNELS}, got {kernel!r}")
    with torch.enable_grad():
        mixed = torch.einsum("nk,knc->nc", lam, g)  # d(mixed loss of i)/d(logits of i)
        if kernel == "raw":
            stepped_w = weight - step * (mixed.T @ h)
            meta_logits = h_meta @ stepped_w.T
            if bias is not None:
                meta_logits = meta_logits + (bias.detach() - step * mixed.sum(0))
        else:
            meta_logits = meta_logits0 - step * (hmc @ (mixed.T @ hc).T)
        return F.cross_entropy(meta_logits, target_meta)


def last_layer_meta_grad(lam: Tensor, h: Tensor, target: Tensor, teacher_logits: Tensor,
                         weight: Tensor, bias: Tensor | None, h_meta: Tensor,
                         target_meta: Tensor, step: float, temperature: float,
                         kernel: str = "raw", kernel_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(meta loss, dL_meta/dlambda) for one simulated SGD step of the last layer
    (:func:`last_layer_meta_loss` with ``lam`` as the leaf)."""
    with torch.enable_grad():
        lam = lam.detach().requires_grad_(True)
        meta_loss = last_layer_meta_loss(lam, h, target, teacher_logits, weight, bias, h_meta,
                                         target_meta, step, temperature, kernel, kernel_scale)
        (grad,) = torch.autograd.grad(meta_loss, lam)
    return meta_loss.detach(), grad


def full_lookahead_meta_loss(model: nn.Module, lam: Tensor, x: Tensor, target: Tensor,
                             teacher_logits: Tensor, x_meta: Tensor, target_meta: Tensor,
                             step: float, temperature: float) -> Tensor:
    """The meta loss after one simulated SGD step of the whole student, differentiable in
    ``lam`` (whatever its leaves).

    theta' = theta - step * grad_theta sum_i sum_j l_ij l_ij(theta) (``step`` per example),
    evaluated functionally (``torch.func.functional_call``) with ``create_graph=True``. The
    model runs in eval mode (restored after): BN uses and never updates its running
    statistics; the model's own parameters are never changed.
    """
    with eval_mode(model), torch.enable_grad():
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        logits = functional_call(model, (params, buffers), (x,))
        terms = per_example_terms(logits, target, teacher_logits.detach(), temperature)
        loss = (lam * terms).sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True,
                                    allow_unused=True)
        stepped = dict(params)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                stepped[n] = params[n] - step * g
        meta_logits = functional_call(model, (stepped, buffers), (x_meta,))
        return F.cross_entropy(meta_logits, target_meta)


def full_lookahead_meta_grad(model: nn.Module, lam: Tensor, x: Tensor, target: Tensor,
                             teacher_logits: Tensor, x_meta: Tensor, target_meta: Tensor,
                             step: float, temperature: float) -> tuple[Tensor, Tensor]:
    """(meta loss, dL_meta/dlambda) for one simulated SGD step of the whole student
    (:func:`full_lookahead_meta_loss` with ``lam`` as the leaf)."""
    with torch.enable_grad():
        lam = lam.detach().requires_grad_(True)
        meta_loss = full_lookahead_meta_loss(model, lam, x, target, teacher_logits, x_meta,
                                             target_meta, step, temperature)
        (grad,) = torch.autograd.grad(meta_loss, lam)
    return meta_loss.detach(), grad


def lookahead_meta_loss(lookahead: str, student: nn.Module, x: Tensor, h: Tensor | None,
                        target: Tensor, teacher_logits: Tensor, x_meta: Tensor,
                        h_meta: Tensor | None, target_meta: Tensor, step: float,
                        temperature: float, kernel: str = "raw", kernel_scale: float = 1.0
                        ) -> Callable[[Tensor], Tensor]:
    """The meta loss as a function of lambda alone: :func:`last_layer_meta_loss` on the
    features ``h`` / ``h_meta`` and the student's final linear layer (in the features'
    dtype) for ``lookahead="last_layer"``, :func:`full_lookahead_meta_loss` on the inputs
    ``x`` / ``x_meta`` for ``"full"``."""
    if lookahead == "full":
        return partial(full_lookahead_meta_loss, student, x=x, target=target,
                       teacher_logits=teacher_logits, x_meta=x_meta, target_meta=target_meta,
                       step=step, temperature=temperature)
    _, head = find_classifier(student)
    return partial(last_layer_meta_loss, h=h, target=target, teacher_logits=teacher_logits,
                   weight=head.weight.to(h.dtype),
                   bias=None if head.bias is None else head.bias.to(h.dtype), h_meta=h_meta,
                   target_meta=target_meta, step=step, temperature=temperature, kernel=kernel,
                   kernel_scale=kernel_scale)


# -- the student's features; the seeded draws of a pass -------------------------------------


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (BN uses, and never updates, its running
    statistics; dropout is off), its own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)



def penultimate_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(the input of the final linear layer, flattened; the model's logits), both in the
    working dtype (:func:`work_dtype`)."""
    with FeatureHooks(model, (PENULTIMATE,)) as features:
        logits = model(x)
    dtype = work_dtype(logits)
    return features[PENULTIMATE].flatten(1).to(dtype), logits.to(dtype)


def work_dtype(t: Tensor) -> torch.dtype:
    """float32 for the lookahead (also under bf16 autocast); float64 stays (tests)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pass_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator seeded by (seed, step, stream): ALM-KD's pass (step = its epoch), TGeo-KD's
    update (step = the optimiser step)."""
    return torch.Generator().manual_seed(((int(seed) * 1_000_003 + int(step)) * 8191
                                          + int(stream)) % (2**63 - 1))


def pass_chunks(n_train: int, chunk_size: int, seed: int, epoch: int, rank: int = 0,
                world: int = 1) -> list[tuple[int, Tensor]]:
    """(chunk id, train positions) of this rank's chunks for the pass at ``epoch``.

    One permutation of the train split per (seed, epoch), cut into chunks of ``chunk_size``;
    rank r takes chunks r, r + world, ..: every chunk is the same whatever the number of
    ranks, and together the ranks cover every example once.
    """
    order = torch.randperm(int(n_train), generator=pass_generator(seed, epoch))
    chunks = list(order.split(int(chunk_size)))
    return [(c, chunks[c]) for c in range(int(rank), len(chunks), int(world))]


def meta_pick(n_meta: int, meta_batch_size: int, seed: int, step: int, stream: int) -> Tensor:
    """The meta examples scoring one lookahead: all of them, or a sample drawn from (seed,
    step, stream) (stream: ALM-KD's chunk, TGeo-KD's rank), so the pick does not depend on
    which rank makes it."""
    if n_meta <= meta_batch_size:
        return torch.arange(n_meta)
    return torch.randperm(n_meta, generator=pass_generator(seed, step, 1 + stream))[
        :meta_batch_size]


# -- DDP: what a pass updated, on every rank ------------------------------------------------


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


def sync_sum(value: Tensor) -> Tensor:
    """The sum of ``value`` over ranks (in place); a no-op without a process group."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value
