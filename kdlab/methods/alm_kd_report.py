"""ALM-KD's reporting: summaries of the weight table, noise detection (AUROC), the per-pass
history and its checkpoint encoding; and TGeo-KD's ratios summarised the same way
(:func:`ratio_results`). Nothing here is read by training.

The noise mask (which training examples had their label changed) is an analysis-only
input: it goes into the summaries and the AUROC, never into the meta pass or the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Summary statistics of a weight column kept per meta pass (history, logs, plot).
GROUPS = ("all", "clean", "noisy")
STATS = ("mean", "std", "q05", "q25", "q50", "q75", "q95")
_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def noise_auroc(label_weight: Tensor, noise_mask: Tensor | None) -> float:
    """How well a LOW label weight flags a noisy label: the AUROC with noisy = positive.

    = P(w_noisy < w_clean) + 1/2 P(w_noisy = w_clean) over all (noisy, clean) pairs
    (Mann-Whitney with tied pairs counted 1/2). 1: every noisy example below every clean
    one; 0.5: no separation. NaN when either group is empty.
    """
    if noise_mask is None:
        return float("nan")
    noisy = noise_mask.detach().cpu().bool()
    w = label_weight.detach().cpu().double()
    pos, neg = w[noisy], w[~noisy]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    # Score = -w (low weight = more likely noisy); average ranks handle ties.
    score = -torch.cat([pos, neg])
    values, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # ranks 1.. of each distinct value start here
    mean_rank = (first + (counts + 1) / 2.0).double()
    ranks = mean_rank[inverse]
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def column_summary(table: Tensor, noise_mask: Tensor | None) -> Tensor:
    """(K+1, 3, 7): per column, for all / clean / noisy examples: mean, std, quantiles.

    NaN where a group is empty (no noisy examples without label noise).
    """
    table = table.detach().double().cpu()
    noisy = (torch.zeros(len(table), dtype=torch.bool) if noise_mask is None
             else noise_mask.cpu().bool())
    out = torch.full((table.shape[1], len(GROUPS), len(STATS)), float("nan"),
                     dtype=torch.float64)
    q = torch.tensor(_QUANTILES, dtype=torch.float64)
    for g, rows in enumerate((torch.ones_like(noisy), ~noisy, noisy)):
        part = table[rows]
        if len(part) == 0:
            continue
        out[:, g, 0] = part.mean(0)
        out[:, g, 1] = part.std(0, correction=0)
        out[:, g, 2:] = torch.quantile(part, q, dim=0).T
    return out


@dataclass
class PassRecord:
    """What one meta pass left: its epoch (Lightning's counter, from 0, of the epoch it ran
    before; -1: the initial table), the column summary and the label weight's noise AUROC
    (NaN without label noise)."""

    epoch: int
    summary: Tensor
    noise_auroc: float = float("nan")
    rebalance: Tensor | None = None  # the global column scales after the pass, if learned

    @property
    def shown_epoch(self) -> int:
        """The epoch the pass ran before, counted from 1 as everything a user reads."""
        return self.epoch + 1


def summarise(epoch: int, table: Tensor, noise_mask: Tensor | None,
              rebalance: Tensor | None = None) -> PassRecord:
    return PassRecord(epoch, column_summary(table, noise_mask),
                      noise_auroc(table[:, 0], noise_mask) if table.numel() else float("nan"),
                      None if rebalance is None else rebalance.detach().double().cpu().clone())


_FORMAT_TAG = 2.0e5 + 11  # first value of every row of the current encoding


def encode_history(history: list[PassRecord]) -> Tensor:
    """One float64 row per pass: [tag, epoch, auroc, n, rebalance (n values), summary..],
    NaN-padded to a common width (a tensor, so checkpoints stay tensors-only)."""
    if not history:
        return torch.zeros(0)
    rows = []
    for r in history:
        reb = (torch.zeros(0, dtype=torch.float64) if r.rebalance is None
               else r.rebalance.double().flatten())
        head = torch.tensor([_FORMAT_TAG, float(r.epoch), r.noise_auroc, float(len(reb))],
                            dtype=torch.float64)
        rows.append(torch.cat([head, reb, r.summary.double().flatten()]))
    width = max(len(row) for row in rows)
    return torch.stack([torch.nn.functional.pad(row, (0, width - len(row)), value=math.nan)
                        for row in rows])


def decode_history(state: Tensor) -> list[PassRecord]:
    """Inverse of :func:`encode_history`; also reads the first format ([epoch, summary..])."""
    if state.numel() == 0:
        return []
    shape = (-1, len(GROUPS), len(STATS))
    out = []
    for row in state.double():
        if float(row[0]) != _FORMAT_TAG:
            out.append(PassRecord(int(row[0]), row[1:].reshape(shape)))
            continue
        n_reb = int(row[3])
        reb = row[4:4 + n_reb].clone() if n_reb else None
        summary = row[4 + n_reb:]
        k = int((~torch.isnan(summary)).nonzero().max()) + 1 if summary.numel() else 0
        width = len(GROUPS) * len(STATS)
        k = -(-k // width) * width  # whole columns (a summary may itself hold NaNs)
        out.append(PassRecord(int(row[1]), summary[:k].reshape(shape).clone(), float(row[2]),
                              reb))
    return out


def merge_history(current: list[PassRecord], state: Tensor) -> list[PassRecord]:
    """``current`` and the passes encoded in ``state`` (:func:`encode_history`), by epoch,
    ``current``'s record winning: restoring a best-epoch checkpoint for testing keeps the
    passes seen after it; a fresh process resuming gets the whole record back."""
    merged = {r.epoch: r for r in decode_history(state)} | {r.epoch: r for r in current}
    return [merged[e] for e in sorted(merged)]


def nan_to_none(value: float) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


def summary_logs(record: PassRecord, column_names: list[str]) -> dict[str, float]:
    """The values logged after a meta pass (means and stds per group, the AUROC)."""
    values = {}
    for j, col in enumerate(column_names):
        for g, group in enumerate(GROUPS):
            for s, stat in enumerate(STATS[:2]):
                v = float(record.summary[j, g, s])
                if not math.isnan(v):
                    key = f"alm/{col}_{stat}" if group == "all" else f"alm/{col}_{group}_{stat}"
                    values[key] = v
    if not math.isnan(record.noise_auroc):
        values["alm/noise_auroc"] = record.noise_auroc
    if record.rebalance is not None:
        for j, col in enumerate(column_names):
            values[f"alm/{col}_scale"] = float(record.rebalance[j])
    return values


def mixing_results(history: list[PassRecord], now: PassRecord, column_names: list[str],
                   extra: dict) -> dict:
    """``results()["mixing"]``: the final table's weights on clean / noisy examples, the
    noise AUROC and its value at every pass. The last pass describes the final table (the
    module may since have been reset to the best-on-val checkpoint for testing); without a
    pass, ``now`` (the table as it is) does."""
    passes = [r for r in history if r.epoch >= 0]
    final = passes[-1] if passes else now
    summary = final.summary
    if summary.shape[0] == 0:
        return {"meta_passes": 0, **extra}
    teacher = summary[1:, :, 0].mean(0)  # mean over teacher columns, per group
    mixing = {
        "label_weight_clean": nan_to_none(summary[0, 1, 0]),
        "label_weight_noisy": nan_to_none(summary[0, 2, 0]),
        "label_weight_clean_median": nan_to_none(summary[0, 1, 4]),
        "label_weight_noisy_median": nan_to_none(summary[0, 2, 4]),
        "teacher_weight_clean": nan_to_none(teacher[1]),
        "teacher_weight_noisy": nan_to_none(teacher[2]),
        "label_weight_mean": nan_to_none(summary[0, 0, 0]),
        "noise_auroc": nan_to_none(final.noise_auroc),
        "noise_auroc_history": {str(r.shown_epoch): nan_to_none(r.noise_auroc)
                                for r in passes},
        "meta_passes": len(passes),
        **extra,
    }
    if final.rebalance is not None:
        mixing["column_scales"] = [float(v) for v in final.rebalance]
    if len(column_names) > 2:
        mixing["teacher_weights_clean"] = [nan_to_none(v) for v in summary[1:, 1, 0]]
        mixing["teacher_weights_noisy"] = [nan_to_none(v) for v in summary[1:, 2, 0]]
    return mixing


def ratio_results(alpha: Tensor, noise_mask: Tensor | None, head: dict) -> dict:
    """TGeo-KD's ``results()["mixing"]``: ``head``, then over the examples with a ratio
    (``alpha``: each example's teacher weight, NaN if never trained on) its mean and std, the
    teacher weight alpha and label weight 1 - alpha of the clean and the noisy examples, and
    the noise AUROC of the label weight."""
    alpha = alpha.detach().double().cpu()
    seen = ~torch.isnan(alpha)
    out = {"examples": int(seen.sum()), **head}
    if not bool(seen.any()):
        return out
    a = alpha[seen]
    out |= {"alpha_mean": float(a.mean()), "alpha_std": float(a.std(correction=0))}
    mask = None if noise_mask is None else noise_mask.cpu().bool()[seen]
    groups = {"clean": a if mask is None else a[~mask], "noisy": a[:0] if mask is None
              else a[mask]}
    for group, part in groups.items():
        value = float(part.mean()) if len(part) else float("nan")
        out[f"teacher_weight_{group}"] = value
        out[f"label_weight_{group}"] = 1.0 - value
    out["noise_auroc"] = noise_auroc(1.0 - a, mask)
    return out
