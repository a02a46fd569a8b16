"""Balanced-divergence online KD, BD-KD (Amara, Sepahvand, Meyer, Gross, Clark, "BD-KD:
Balancing the Divergences for Online Knowledge Distillation", arXiv 2212.12965).

Online KD: the student (small) and a peer (the online "teacher", larger by default: the
run's teacher architecture, trained from scratch here) learn together, like DML, but the
distillation term of each example mixes the forward KL(p_t || p_s) and the reverse
KL(p_s || p_t) (paper notation: t = the online teacher, s = the student) with a sample-wise
weight. With p^T(z) = softmax(z / T), H the entropy, and the other network's output
detached in each network's own loss:

    r_i      = weight of the reverse KL for example i (below)
    D_i      = (1 - r_i) * KL(p^T(t_i) || p^T(s_i)) + r_i * KL(p^T(s_i) || p^T(t_i))
    L_student = w_ce * CE(s, y) + w_kd * T^2 * mean_i D_i          (p_t detached)
    L_peer    = w_ce * CE(t, y) + w_kd * T^2 * mean_i D'_i         (p_s detached)

``weighting`` chooses r_i from the two networks' (detached) entropies:

    hard       r_i = 1[ H(p^T(s_i)) > H(p^T(t_i)) ]                              (default)
    soft       r_i = sigmoid( (H(p^T(s_i)) - H(p^T(t_i))) / gap_scale )
    constant   r_i = reverse_weight

Rationale: where the student is less certain than the teacher, the mode-seeking reverse KL
sharpens it towards the teacher's mode; where it is more certain, the mass-covering forward
KL spreads it over the teacher's alternatives -- a per-example pull against both over- and
under-confidence, which is what the paper aims at (calibration without temperature scaling).

``peer_divergence`` chooses the peer's term D'_i:

    balanced   D'_i = D_i, the same per-example mixture, with the gradient through p_t (both
               networks' losses are adjusted sample-wise)                     (default)
    reverse    D'_i = KL(p^T(s_i) || p^T(t_i)), the usual online (DML) teacher term

With ``weighting=constant reverse_weight=0 peer_divergence=reverse`` this is exactly DML.

**What is verified.** From the paper's abstracts (v1, v2) and a third-party summary of v2:
online KD; the student's loss mixes forward and reverse KL sample-wise, guided by the gap
between the teacher's and the student's entropy; both networks' losses are adjusted (the
summary says the teacher's uses reverse KL as a regulariser); the claim is accuracy and
calibration without temperature scaling. **Not verified** (the method section could not be
read, and no official code was found): the exact weighting function, whether the teacher's
term is weighted too, the temperature, and the loss weights. The choices above are this
implementation's, made explicit as options. Defaults: T = 1, w_ce = w_kd = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import kl_divergence
from .dml import DML, Peer, log_probs

Weighting = Literal["hard", "soft", "constant"]
PeerDivergence = Literal["balanced", "reverse"]


def entropy(log_p: Tensor) -> Tensor:
    """H(p) = -sum_c p_c log p_c per row (0 log 0 = 0)."""
    return -(log_p.exp() * log_p).nan_to_num(0.0).sum(-1)


def reverse_weights(log_p_s: Tensor, log_p_t: Tensor, weighting: str, gap_scale: float = 1.0,
                    reverse_weight: float = 0.5) -> Tensor:
    """r_i, the per-example weight of the reverse KL, from detached distributions."""
    gap = entropy(log_p_s.detach()) - entropy(log_p_t.detach())
    if weighting == "hard":
        return (gap > 0).to(log_p_s.dtype)
    if weighting == "soft":
        return torch.sigmoid(gap / gap_scale)
    return torch.full_like(gap, float(reverse_weight))


def balanced_divergence(log_p_s: Tensor, log_p_t: Tensor, r: Tensor) -> Tensor:
    """mean_i (1 - r_i) KL(p_t || p_s) + r_i KL(p_s || p_t)."""
    forward = kl_divergence(log_p_t, log_p_s)
    reverse = kl_divergence(log_p_s, log_p_t)
    return ((1 - r) * forward + r * reverse).mean()


class BDKD(DML):
    name = "bdkd"
    description = ("BD-KD online KD: student and peer mix forward/reverse KL per example "
                   "by their entropy gap")
    distill_term = "kd"

    def __init__(self, peer: Peer = None, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 temperature: float = 1.0, weighting: Weighting = "hard",
                 gap_scale: float = 1.0, reverse_weight: float = 0.5,
                 peer_divergence: PeerDivergence = "balanced"):
        super().__init__(peer=peer, ce_weight=ce_weight, kl_weight=kd_weight,
                         temperature=temperature)
        if gap_scale <= 0:
            raise ConfigError(f"method.gap_scale must be > 0, got {gap_scale}")
        if not 0.0 <= reverse_weight <= 1.0:
            raise ConfigError(f"method.reverse_weight must be in [0, 1], got {reverse_weight}")

    def mutual_terms(self, student_logits: Tensor, peer_logits: Tensor
                     ) -> tuple[Tensor, Tensor]:
        t = self.temperature
        log_s, log_t = log_probs(student_logits, t), log_probs(peer_logits, t)
        log_t = log_t.to(log_s.dtype)
        r = reverse_weights(log_s, log_t, self.weighting, self.gap_scale, self.reverse_weight)
        student = balanced_divergence(log_s, log_t.detach(), r)
        if self.peer_divergence == "balanced":
            peer = balanced_divergence(log_s.detach(), log_t, r)
        else:
            peer = kl_divergence(log_s.detach(), log_t).mean()
        if self.ctx is not None and torch.is_grad_enabled():
            self.ctx.log("train/bdkd_reverse_weight", r.mean(), on_step=False, on_epoch=True,
                    batch_size=r.shape[0])
        return t * t * student, t * t * peer
