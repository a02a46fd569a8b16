"""Model selection: which validated epoch is "best" (``checkpoints/best.ckpt``,
results.json ``test``), by a rule that says what it does with ties.

The rule (config node ``selection``): a validation metric (``metric``, e.g. ``val/acc``),
maximised or minimised (``mode``, by default from the metric's name: accuracies up, ECE,
NLL and Brier down), then ``tie_break``: further val metrics (each in its own direction)
and ``last`` (the later epoch) or ``first`` (the earlier one), compared in order. When
every entry ties, the earlier epoch is kept. The chosen epoch is a function of the
validation history alone, so a resumed run (whose history comes back from last.ckpt)
selects what the uninterrupted run selects.

Epochs are counted from 1 here, as in everything a user reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .metrics import RESULT_METRICS

VAL_METRICS = tuple(f"val/{name}" for name in RESULT_METRICS)
MAXIMISED = ("val/acc", "val/acc_top5")
EPOCH_ORDER = {"last": "the later epoch", "first": "the earlier epoch"}
MODES = ("max", "min")


@dataclass(frozen=True)
class Record:
    """One validated epoch: its number (from 1) and its val metrics (``val/acc``, ...)."""

    epoch: int
    values: dict[str, float]


def _mode_of(metric: str) -> str:
    return "max" if metric in MAXIMISED else "min"


def _best_word(mode: str) -> str:
    return "highest" if mode == "max" else "lowest"


def _epochs(records: list[Record]) -> str:
    numbers = ", ".join(str(r.epoch) for r in records)
    return f"epoch{'s' if len(records) > 1 else ''} {numbers}"


@dataclass(frozen=True)
class SelectionRule:
    metric: str = "val/acc"
    mode: str = "max"
    tie_break: tuple[str, ...] = ("val/nll", "last")

    @classmethod
    def from_config(cls, node: Any) -> SelectionRule:
        """The rule of a ``selection`` config node (None: the default), checked: a one-line
        :class:`ConfigError` names a bad value and what is allowed."""
        node = dict(node or {})
        unknown = sorted(set(node) - {"metric", "mode", "tie_break"})
        if unknown:
            raise ConfigError(f"unknown key selection.{unknown[0]}; selection takes: metric, "
                              "mode, tie_break")
        metric = str(node.get("metric") or cls.metric)
        if metric not in VAL_METRICS:
            raise ConfigError(f"selection.metric must be a validation metric: "
                              f"{', '.join(VAL_METRICS)}; got {metric!r}")
        mode = node.get("mode")
        mode = _mode_of(metric) if mode is None else str(mode)
        if mode not in MODES:
            raise ConfigError(f"selection.mode must be max, min or null (from the metric's "
                              f"name), got {mode!r}")
        tie_break = node.get("tie_break", cls.tie_break)
        if isinstance(tie_break, str):
            tie_break = [tie_break]
        tie_break = [str(t) for t in (tie_break or ())]
        for i, entry in enumerate(tie_break):
            if entry not in VAL_METRICS and entry not in EPOCH_ORDER:
                raise ConfigError(f"selection.tie_break entry {entry!r} is neither a validation "
                                  f"metric ({', '.join(VAL_METRICS)}) nor last/first")
            if entry in EPOCH_ORDER and i != len(tie_break) - 1:
                raise ConfigError(f"selection.tie_break: {entry!r} decides every remaining tie,"
                                  " so it must come last")
        # a metric compared already decides nothing more (e.g. metric=val/nll with the
        # default tie_break [val/nll, last])
        kept = [t for i, t in enumerate(tie_break) if t != metric and t not in tie_break[:i]]
        return cls(metric, mode, tuple(kept))

    # -- choosing ---------------------------------------------------------------------------
    def _criteria(self) -> list[tuple[str, str]]:
        """(metric or "last"/"first", mode) in the order they decide."""
        return [(self.metric, self.mode)] + [(t, "max" if t == "last" else "min")
                                             if t in EPOCH_ORDER else (t, _mode_of(t))
                                             for t in self.tie_break]

    def key(self, record: Record) -> tuple[float, ...]:
        """Larger is better; a missing or NaN value is worst."""
        out = []
        for name, mode in self._criteria():
            value = (float(record.epoch) if name in EPOCH_ORDER
                     else float(record.values.get(name, math.nan)))
            if math.isnan(value):
                out.append(-math.inf)
            else:
                out.append(value if mode == "max" else -value)
        return tuple(out)

    def select(self, records: list[Record]) -> Record:
        """The best record (on a full tie, the earliest: ``max`` keeps the first)."""
        return max(records, key=self.key)

    # -- saying what it did -----------------------------------------------------------------
    def describe(self) -> str:
        """``best val/acc, ties broken by lower val/nll, then the later epoch``."""
        text = f"{'best' if self.mode == _mode_of(self.metric) else _best_word(self.mode)} " \
               f"{self.metric}"
        steps = [EPOCH_ORDER[t] if t in EPOCH_ORDER
                 else f"{'higher' if _mode_of(t) == 'max' else 'lower'} {t}"
                 for t in self.tie_break]
        if steps:
            text += f", ties broken by {', then '.join(steps)}"
        return text

    def explain(self, records: list[Record], chosen: Record) -> str:
        """Why ``chosen``: ``highest val/acc 0.9861; tied with epochs 12, 30; lowest val/nll
        0.0712 among them`` or ``highest val/acc 0.9861, no tie``."""
        parts = []
        tied = records
        for i, (name, mode) in enumerate(self._criteria()):
            if name in EPOCH_ORDER:
                parts.append(EPOCH_ORDER[name])
                break
            value = chosen.values.get(name, math.nan)
            parts.append(f"{_best_word(mode)} {name} {value:.4f}" + (" among them" if i else ""))
            tied = [r for r in tied if self.key(r)[: i + 1] == self.key(chosen)[: i + 1]]
            others = [r for r in tied if r is not chosen]
            if not others:
                break
            parts.append(f"tied with {_epochs(others)}")
        else:  # every criterion tied: the earliest of them
            parts.append("the earlier epoch")
        if len(parts) == 1:
            return f"{parts[0]}, no tie"
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        """What determines the choice (results.json, the teacher cache key)."""
        return {"metric": self.metric, "mode": self.mode, "tie_break": list(self.tie_break)}


def selection_rule(cfg: Any) -> SelectionRule:
    """The rule of a run config (its ``selection`` node; the default without one)."""
    node = cfg.get("selection") if hasattr(cfg, "get") else None
    if node is not None and not isinstance(node, dict):
        from omegaconf import OmegaConf

        node = OmegaConf.to_container(node, resolve=True)
    return SelectionRule.from_config(node)


__all__ = ["Record", "SelectionRule", "VAL_METRICS", "selection_rule"]
