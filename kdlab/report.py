"""The library behind ``kdlab report PATH...`` (the command's arguments: :mod:`kdlab.cli`):
many runs, one table.

Finds run directories under each PATH (single runs and multirun trees: a directory with
``.hydra/config.yaml``, or ``config.yaml`` next to ``results.json``/``failed.json``), groups
the finished runs by their configuration minus the seed and prints mean +/- std over the
seeds of each group. Default grouping: ``method`` plus every override (from
``.hydra/overrides.yaml``) whose value differs between runs, except ``seed`` and the keys that
do not change the experiment (``resume``, ``logger``, threads, paths:
:func:`kdlab.config.not_the_experiment`); ``--by`` names the keys instead (config keys such
as ``noise.rate``, or config groups such as ``method``).

Metrics are dotted paths into ``results.json`` (``test.acc``, ``test_last.ece``, ``val.nll``,
``mixing.label_weight_noisy``, ``teachers.0.agreement``); ``teacher.X`` is the first
teacher's ``X`` (``teacher.agreement``) or its test metric ``X`` (``teacher.acc``), and a bare
``X`` is ``test.X``. ``test`` is the checkpoint the run's selection rule picked on the
validation split, ``test_last`` the last epoch. std is the sample standard deviation over
seeds (n - 1); with one seed there is none. Without ``--metric`` the table also has the
results keys that the runs' methods declare (``Method.report_metrics``).

Failed runs (``failed.json``) and unfinished ones (neither file) are listed in their own
section and never averaged in. Written to ``--out`` (default: the first PATH):
``report.md``, ``report.csv``, ``report_acc_vs_ece.png``, when the runs hold the data
``report_reliability.png`` (``results.json`` "reliability" per-bin sums, pooled over seeds),
and the figures the runs' methods declare (``Method.report_plots``,
:class:`kdlab.methods.base.ReportPlot`); with ``--html`` also ``report.html``, one
self-contained page with the tables and every plot inlined (with the files the methods name
in ``Method.run_plots`` of each run; :mod:`kdlab.report_html`). The report finds a run's
method through its config's ``method._target_`` and never names one.

``--baseline METHOD`` adds, for every group, its difference from the baseline method's group
with the same values of the other grouping keys, per metric, with a 95 % interval over
seeds: paired by seed when the two groups share at least two seeds (the per-seed
differences over the shared seeds: mean +/- t_{0.975, n-1} sd / sqrt(n)), Welch's unpaired
interval otherwise (:func:`seed_difference`). Intervals that exclude 0 are marked ``*``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import OmegaConf

from .config import changes_the_experiment, import_target, suggest
from .errors import ConfigError
from .methods.base import GroupStats, ReportPlot
from .plots import plt, reliability_grid, wrap_label  # pyplot on Agg

DEFAULT_METRICS = ("test.acc", "test.ece", "test_last.acc", "test_last.ece", "teacher.acc")
HEADERS = {"test.acc": "test acc (best)", "test.ece": "test ECE (best)",
           "test_last.acc": "test acc (last)", "test_last.ece": "test ECE (last)",
           "teacher.acc": "teacher test acc"}
NEVER_GROUP = ("seed",)  # and the keys that do not change the experiment (not_the_experiment)
SKIP_DIRS = {"wandb", "tensorboard", "logs", "checkpoints", "ranks"}
# Config parts that may differ within a group without a note: the seed, extra callbacks, and
# every key that does not change the experiment (kdlab.config.not_the_experiment: resume,
# logger, threads, machine paths ...; the list that also keeps them out of job dir names).
NOT_NOTED = ("seed", "callbacks")


class ReportError(Exception):
    pass


@dataclass
class Run:
    path: Path
    status: str                       # finished | failed | interrupted | unfinished
    config: dict[str, Any]
    overrides: dict[str, str] = field(default_factory=dict)
    choices: dict[str, str] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    error: str = ""

    def value(self, key: str) -> str:
        """The run's value for a grouping key: a config group's choice or a config value."""
        choice = self.choices.get(key) or (self.config.get("choices") or {}).get(key)
        if choice is not None:
            return str(choice)
        found = OmegaConf.select(OmegaConf.create(self.config), key, default="-") \
            if self.config else "-"
        if found != "-" and not OmegaConf.is_config(found):
            return _fmt(found)
        if self.results and not isinstance(self.results.get(key, {}), (dict, list)):
            return _fmt(self.results[key])
        if key in self.overrides:
            return self.overrides[key]
        if OmegaConf.is_config(found):
            return json.dumps(OmegaConf.to_container(found), sort_keys=True)
        return "-"

    @property
    def seed(self) -> str:
        return _fmt(self.config["seed"]) if "seed" in self.config else "-"


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


# -- finding and reading runs ------------------------------------------------------------------


def is_run_dir(d: Path) -> bool:
    if (d / ".hydra" / "config.yaml").is_file():
        return True
    return (d / "config.yaml").is_file() and any(
        (d / name).is_file() for name in ("results.json", "failed.json"))


def find_runs(paths: list[Path]) -> list[Run]:
    found: list[Path] = []
    for root in paths:
        stack = [root]
        while stack:
            d = stack.pop()
            if is_run_dir(d):
                found.append(d)
                continue  # runs do not nest
            stack.extend(c for c in d.iterdir() if c.is_dir() and not c.name.startswith(".")
                         and c.name not in SKIP_DIRS)
    unique = sorted({p.resolve(): p for p in found}.values(), key=_natural_key)
    return [read_run(p) for p in unique]


def read_run(d: Path) -> Run:
    config_file = d / "config.yaml" if (d / "config.yaml").is_file() else d / ".hydra/config.yaml"
    run = Run(path=d, status="unfinished", config=_load_yaml(config_file) or {})
    for item in _load_yaml(d / ".hydra" / "overrides.yaml") or []:
        key, _, value = str(item).lstrip("+~").partition("=")
        run.overrides[key] = value
    hydra_cfg = _load_yaml(d / ".hydra" / "hydra.yaml") or {}
    run.choices = dict(((hydra_cfg.get("hydra") or {}).get("runtime") or {}).get("choices") or {})
    if (d / "results.json").is_file():
        run.results = json.loads((d / "results.json").read_text())
        run.status = str(run.results.get("status", "finished"))
    elif (d / "failed.json").is_file():
        failed = json.loads((d / "failed.json").read_text())
        run.status = str(failed.get("status", "failed"))
        run.error = str(failed.get("error", ""))
    return run


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


# -- one table ---------------------------------------------------------------------------------


def _index_lists(data: Any) -> Any:
    """Lists of dicts (teachers) become dicts keyed "0", "1", ... so they flatten too."""
    if isinstance(data, dict):
        return {k: _index_lists(v) for k, v in data.items()}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {str(i): _index_lists(v) for i, v in enumerate(data)}
    return data


def results_frame(runs: list[Run], keys: list[str]) -> pd.DataFrame:
    """One row per finished run: every results.json value by dotted path, plus the
    grouping keys and the seed."""
    finished = [r for r in runs if r.status == "finished"]
    if not finished:
        return pd.DataFrame(columns=[*keys, "seed", "run"])
    frame = pd.json_normalize([_index_lists(r.results) for r in finished], sep=".")
    for key in keys:
        frame[key] = [r.value(key) for r in finished]
    frame["seed"] = [r.seed for r in finished]
    frame["run"] = [str(r.path) for r in finished]
    return frame


def metric_column(frame: pd.DataFrame, metric: str) -> str:
    """The results.json column a metric name refers to (aliases resolved)."""
    if metric.startswith("teacher."):
        rest = metric[len("teacher."):]
        direct = f"teachers.0.{rest}"
        return direct if direct in frame.columns else f"teachers.0.test.{rest}"
    return metric if "." in metric else f"test.{metric}"


def check_metrics(frame: pd.DataFrame, metrics: list[str]) -> None:
    """A metric that no finished run has is a typo: say which names exist."""
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
    for metric in metrics:
        if metric_column(frame, metric) not in frame.columns and len(frame):
            hint = suggest(metric_column(frame, metric), numeric)
            raise ReportError(f"--metric {metric}: no finished run has it{hint} "
                              f"(e.g. {', '.join(numeric[:6])})")


def summarize(frame: pd.DataFrame, keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """Per group: n, seeds, and mean / sample std / count of every metric."""
    columns = {m: metric_column(frame, m) for m in metrics}
    data = frame.assign(**{m: pd.to_numeric(frame[c], errors="coerce") if c in frame.columns
                           else float("nan") for m, c in columns.items()})
    grouped = data.groupby(keys, sort=False, dropna=False)
    out = grouped.agg(n=("seed", "size"), seeds=("seed", ",".join))
    for m in metrics:
        out[f"{m}_mean"] = grouped[m].mean()
        out[f"{m}_std"] = grouped[m].std(ddof=1)
        out[f"{m}_n"] = grouped[m].count()
    return out.reset_index()


def display_table(summary: pd.DataFrame, keys: list[str], metrics: list[str],
                  headers: dict[str, str] | None = None) -> pd.DataFrame:
    """The summary as shown: one ``mean ± std`` text cell per metric, under its header
    (``headers``, default :data:`HEADERS`; the metric's name without one)."""
    def cell(row, m):
        mean, std = row[f"{m}_mean"], row[f"{m}_std"]
        if pd.isna(mean):
            return "-"
        return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"

    headers = HEADERS if headers is None else headers
    table = summary[[*keys, "n", "seeds"]].copy()
    for m in metrics:
        table[headers.get(m, m)] = [cell(row, m) for _, row in summary.iterrows()]
    return table


def markdown_table(summary: pd.DataFrame, keys: list[str], metrics: list[str]) -> str:
    return display_table(summary, keys, metrics).to_markdown(index=False, tablefmt="pipe",
                                                             disable_numparse=True)


# -- differences from a baseline --------------------------------------------------------------


def t_quantile(df: float, level: float = 0.975) -> float:
    """The ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(level, df))


def seed_difference(values: pd.Series, baseline: pd.Series) -> dict[str, Any] | None:
    """Mean difference ``values - baseline`` (metric values indexed by seed) with a 95 %
    interval: ``diff``, ``lo``, ``hi``, ``paired``, ``n``, ``df``.

    Paired when the two share at least two seeds and neither repeats one: d_s = values_s -
    baseline_s over the shared seeds s, diff = mean(d), interval diff +/- t_{0.975, n-1}
    sd(d) / sqrt(n), n = the shared seeds. Otherwise Welch: diff = mean(values) -
    mean(baseline), se^2 = var_a / n_a + var_b / n_b, Welch-Satterthwaite df, n = the runs of
    ``values``; with fewer than two runs on either side, the difference alone (no interval).
    Zero spread gives the interval [diff, diff]. None when either side has no value."""
    values, baseline = values.dropna().astype(float), baseline.dropna().astype(float)
    if values.empty or baseline.empty:
        return None
    shared = sorted(set(values.index) & set(baseline.index))
    unique = values.index.is_unique and baseline.index.is_unique
    if unique and len(shared) >= 2:
        d = values[shared] - baseline[shared]
        n, diff, df = len(d), float(d.mean()), float(len(d) - 1)
        se = float(d.std(ddof=1)) / math.sqrt(n)
        paired = True
    else:
        n, paired = len(values), False
        diff = float(values.mean() - baseline.mean())
        if len(values) < 2 or len(baseline) < 2:
            return {"diff": diff, "lo": math.nan, "hi": math.nan, "paired": False, "n": n,
                    "df": math.nan}
        var_a, var_b = values.var(ddof=1) / len(values), baseline.var(ddof=1) / len(baseline)
        se = math.sqrt(var_a + var_b)
        df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(values) - 1)
                                     + var_b ** 2 / (len(baseline) - 1)) if se > 0 else math.nan
    half = t_quantile(df) * se if se > 0 else 0.0
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "paired": paired, "n": n,
            "df": df}


def resolved(lo: float, hi: float) -> bool:
    """The interval excludes 0."""
    return lo > 0 or hi < 0


def difference_text(found: dict[str, Any] | None, digits: int = 2) -> str:
    """A :func:`seed_difference` as a table cell: ``+diff [lo, hi] *`` (``*`` when the
    interval excludes 0), the difference alone with too few runs for an interval, empty for
    None."""
    if found is None:
        return ""
    text = f"{found['diff']:+.{digits}f}"
    if math.isnan(found["lo"]):
        return text
    mark = " *" if resolved(found["lo"], found["hi"]) else ""
    return f"{text} [{found['lo']:+.{digits}f}, {found['hi']:+.{digits}f}]{mark}"


def baseline_differences(frame: pd.DataFrame, summary: pd.DataFrame, keys: list[str],
                         metrics: list[str], baseline: str) -> pd.DataFrame:
    """``summary`` plus, per metric m, ``m_diff``, ``m_diff_lo``, ``m_diff_hi``,
    ``m_diff_paired``, ``m_diff_n``, ``m_diff_df`` (:func:`seed_difference`) against the row
    of method ``baseline`` with the same values of the other keys; empty (NaN) for the
    baseline rows themselves and for rows without such a baseline row."""
    others = [k for k in keys if k != "method"]
    groups = {key if isinstance(key, tuple) else (key,): rows
              for key, rows in frame.groupby(keys, sort=False, dropna=False)}
    base_rows = {tuple(row[k] for k in others): tuple(row[k] for k in keys)
                 for _, row in summary.iterrows() if row["method"] == baseline}
    out = summary.copy()
    for m in metrics:
        column = metric_column(frame, m)
        found = []
        for _, row in summary.iterrows():
            group = tuple(row[k] for k in keys)
            base = base_rows.get(tuple(row[k] for k in others))
            if column not in frame or base is None or base == group:
                found.append(None)
                continue
            found.append(seed_difference(_by_seed(groups[group], column),
                                         _by_seed(groups[base], column)))
        for field_name in ("diff", "lo", "hi", "paired", "n", "df"):
            name = f"{m}_diff" if field_name == "diff" else f"{m}_diff_{field_name}"
            dtype = {"paired": "boolean", "n": "Int64"}.get(field_name, "float64")
            out[name] = pd.array([None if f is None else f[field_name] for f in found],
                                 dtype=dtype)
    return out


def _by_seed(rows: pd.DataFrame, column: str) -> pd.Series:
    return pd.Series(pd.to_numeric(rows[column], errors="coerce").to_numpy(),
                     index=rows["seed"].to_numpy())


def difference_table(diffs: pd.DataFrame, keys: list[str], metrics: list[str],
                     baseline: str, headers: dict[str, str] | None = None) -> pd.DataFrame:
    """The differences as shown: ``+diff [lo, hi]`` with ``*`` when the interval excludes 0
    and how it was computed; ``baseline`` on the baseline rows, empty without a baseline."""
    def cell(row, m):
        diff = row[f"{m}_diff"]
        if row["method"] == baseline:
            return "baseline"
        if pd.isna(diff):
            return ""
        lo, hi, n = row[f"{m}_diff_lo"], row[f"{m}_diff_hi"], int(row[f"{m}_diff_n"])
        how = f"paired, n={n}" if row[f"{m}_diff_paired"] else f"Welch, n={n}"
        if pd.isna(lo):
            return f"{diff:+.4f} ({how}: no interval)"
        mark = "*" if resolved(lo, hi) else ""
        return f"{diff:+.4f} [{lo:+.4f}, {hi:+.4f}]{mark} ({how})"

    headers = HEADERS if headers is None else headers
    table = diffs[[*keys, "n", "seeds"]].copy()
    for m in metrics:
        table[f"Δ {headers.get(m, m)}"] = [cell(row, m) for _, row in diffs.iterrows()]
    return table


def difference_legend(baseline: str, others: list[str]) -> list[str]:
    same = f" with the same {', '.join(others)}" if others else ""
    return [f"Δ = group − the `method={baseline}` group{same}, with a 95 % interval over "
            "seeds. paired: over the seeds both groups have (at least two), the per-seed "
            "differences' mean ± t(0.975, n−1) · sd / √n, n = shared seeds; Welch: unpaired "
            "(the groups share fewer than two seeds), mean difference ± t(0.975, df) · "
            "√(var₁/n₁ + var₂/n₂) with Welch–Satterthwaite df, n = this group's runs.",
            "`*`: the interval excludes 0, the difference is resolved at 95 %; no `*`: it is "
            "not. Empty: no baseline group with the same other keys."]


def default_keys(runs: list[Run]) -> list[str]:
    """``method`` plus every override key whose value differs between runs (never the seed,
    nor a key that does not change the experiment, such as resume or logger)."""
    keys: list[str] = ["method"]
    for run in runs:
        for key in run.overrides:
            if key not in keys and key not in NEVER_GROUP and not key.startswith("hydra") \
                    and changes_the_experiment(key):
                keys.append(key)
    return [k for k in keys if k == "method" or len({r.value(k) for r in runs}) > 1]


def config_differences(runs: list[Run]) -> list[str]:
    """Config keys that differ between ``runs`` (other than the seed, callbacks, and keys
    that do not change the experiment)."""
    flat = pd.json_normalize([r.config for r in runs], sep=".")
    return [c for c in flat.columns if changes_the_experiment(c) and not any(
        c == k or c.startswith(f"{k}.") for k in NOT_NOTED)
        and flat[c].astype(str).nunique(dropna=False) > 1]


# -- plots -------------------------------------------------------------------------------------


def _label(row, keys: list[str]) -> str:
    return ", ".join(f"{k}={row[k]}" for k in keys)


MARKERS = "osD^vP*Xhp"  # a new marker for every 10 groups (the colour cycle's length)


def plot_acc_vs_ece(summary: pd.DataFrame, keys: list[str], path: Path) -> Path | None:
    points = summary.dropna(subset=["test.acc_mean", "test.ece_mean"]) \
        if "test.acc_mean" in summary and "test.ece_mean" in summary else summary.iloc[0:0]
    if points.empty:
        return None
    labels = [wrap_label(_label(row, keys)) for _, row in points.iterrows()]
    # the legend beside the axes, never on a point: the figure is as tall as the legend needs
    legend_inches = sum(0.12 * (label.count("\n") + 1) + 0.06 for label in labels) + 0.6
    fig, ax = plt.subplots(figsize=(9.5, max(4.5, legend_inches)), layout="constrained")
    for i, ((_, row), label) in enumerate(zip(points.iterrows(), labels, strict=True)):
        ax.errorbar(row["test.ece_mean"], row["test.acc_mean"],
                    xerr=0 if pd.isna(row["test.ece_std"]) else row["test.ece_std"],
                    yerr=0 if pd.isna(row["test.acc_std"]) else row["test.acc_std"],
                    fmt=MARKERS[i // 10 % len(MARKERS)], capsize=3, label=label)
    ax.set_xlabel("test ECE (best on val; lower is better)")
    ax.set_ylabel("test accuracy (best on val)")
    ax.set_title("accuracy vs calibration: mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pooled_reliability(runs: list[Run]) -> dict[str, list[float]] | None:
    """Per-bin sums (count, confidence, correct) added over runs; None if any lacks them."""
    total: dict[str, list[float]] | None = None
    for run in runs:
        bins = (run.results or {}).get("reliability")
        if not bins or not all(k in bins for k in ("count", "confidence", "correct")):
            return None
        if total is None:
            total = {k: [0.0] * len(bins["count"]) for k in ("count", "confidence", "correct")}
        if len(bins["count"]) != len(total["count"]):
            return None
        for k in total:
            total[k] = [a + float(b) for a, b in zip(total[k], bins[k], strict=True)]
    return total


def plot_reliability(groups: list[tuple[str, list[Run]]], path: Path) -> Path | None:
    panels = [(f"{label} ({len(runs)} {'run' if len(runs) == 1 else 'runs'})", bins)
              for label, runs in groups if (bins := pooled_reliability(runs)) is not None]
    if not panels:
        return None
    return reliability_grid(panels, path, "reliability on test (best on val), bins pooled "
                                          "over seeds")


# -- what the runs' methods declare ------------------------------------------------------------


def method_class(run: Run) -> type | None:
    """The class of the run's method (its config's ``method._target_``); None when the run
    does not name one or it cannot be imported here."""
    target = (run.config.get("method") or {}).get("_target_")
    if not target:
        return None
    try:
        found = import_target(str(target), "method")
    except ConfigError:
        return None
    return found if isinstance(found, type) else None


def declared(runs: list[Run], attribute: str) -> list:
    """``attribute`` of the methods of ``runs``: each method once, in the order of the runs."""
    classes = list(dict.fromkeys(c for c in map(method_class, runs) if c is not None))
    return [getattr(c, attribute) for c in classes if hasattr(c, attribute)]


def declared_metrics(runs: list[Run]) -> dict[str, str]:
    """The results keys the methods of ``runs`` want in the default table, with headers."""
    return {key: header for metrics in declared(runs, "report_metrics")
            for key, header in metrics.items()}


def method_plots(runs: list[Run], frame: pd.DataFrame, keys: list[str],
                 out: Path) -> list[tuple[ReportPlot, Path]]:
    """The figures the methods of ``runs`` declare, drawn over every group with a value
    (one figure per name, whichever methods declare it)."""
    plots = {p.name: p for plots in declared(runs, "report_plots") for p in plots}
    drawn = []
    for plot in plots.values():
        columns = list(plot.columns)
        if not all(c in frame for c in columns):
            continue
        rows = summarize(frame, keys, columns).dropna(subset=[f"{c}_mean" for c in columns],
                                                      how="all")
        if rows.empty:
            continue
        groups = [GroupStats(_label(r, keys), {c: float(r[f"{c}_mean"]) for c in columns},
                             {c: float(r[f"{c}_std"]) for c in columns})
                  for _, r in rows.iterrows()]
        path = out / f"{plot.name}.png"
        plot.draw(groups, path)
        drawn.append((plot, path))
    return drawn


def run_plots(runs: list[Run], out: Path) -> dict[str, list[tuple[str, Path]]]:
    """The files each run's method names in ``run_plots`` that the run has, by heading."""
    found: dict[str, list[tuple[str, Path]]] = {}
    for run in runs:
        for name, heading in getattr(method_class(run), "run_plots", {}).items():
            if (run.path / name).is_file():
                found.setdefault(heading, []).append(
                    (f"{_relative(run.path, out)} (seed {run.seed})", run.path / name))
    return found


# -- the report --------------------------------------------------------------------------------


@dataclass
class Report:
    """What a report shows; rendered as markdown (report.md) and, on request, HTML."""
    sources: list[Path]
    finished: int
    others: list[Run]
    keys: list[str]
    metrics: list[str]
    summary: pd.DataFrame
    table: pd.DataFrame | None          # the summary as shown (mean ± std cells)
    failed: pd.DataFrame | None         # failed or unfinished runs
    notes: list[str]
    plots: list[Path]                   # report_*.png in the output directory
    captions: dict[str, str]            # the methods' figures: file stem -> caption
    run_plots: dict[str, list[tuple[str, Path]]]  # the methods' per-run figures, by heading
    baseline: str | None = None         # --baseline METHOD
    differences: pd.DataFrame | None = None  # the difference table as shown (--baseline)
    difference_notes: list[str] = field(default_factory=list)  # its legend

    @property
    def intro(self) -> list[str]:
        groups = len(self.summary)
        return [f"{self.finished} finished runs in {groups} groups; {len(self.others)} failed "
                f"or unfinished{' (listed below, not averaged)' if self.others else ''}.",
                "mean ± sample std over seeds; best = the epoch each run's selection rule "
                "picked (results.json selection), last = last epoch; accuracy and ECE (15 "
                "bins) are fractions."]

    def markdown(self) -> str:
        lines = ["# kdlab report", "",
                 "Runs under: " + ", ".join(f"`{p}`" for p in self.sources), ""]
        for paragraph in self.intro:
            lines += [paragraph, ""]
        if self.table is not None:
            lines += [self.table.to_markdown(index=False, tablefmt="pipe",
                                             disable_numparse=True), ""]
        lines += [f"- note: {n}" for n in self.notes]
        if self.differences is not None:
            lines += ["", f"## Difference from the baseline `method={self.baseline}`", "",
                      self.differences.to_markdown(index=False, tablefmt="pipe",
                                                   disable_numparse=True), ""]
            lines += [f"- {n}" for n in self.difference_notes]
        if self.failed is not None:
            lines += ["", "## Failed or unfinished runs", "",
                      self.failed.to_markdown(index=False, tablefmt="pipe",
                                              disable_numparse=True), ""]
        if self.plots:
            lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in self.plots]
        return "\n".join(lines).rstrip() + "\n"


def build_report(runs: list[Run], keys: list[str], metrics: list[str] | None, out: Path,
                 sources: list[Path], baseline: str | None = None) -> Report:
    """The report; ``metrics`` None: :data:`DEFAULT_METRICS` and the keys the finished runs'
    methods declare (those some run has). With ``baseline`` (a method some finished run
    has, ``method`` among the keys) ``summary`` also holds the differences
    (:func:`baseline_differences`)."""
    finished = [r for r in runs if r.status == "finished"]
    others = [r for r in runs if r.status != "finished"]
    frame = results_frame(runs, keys)
    own = declared_metrics(finished)
    headers = {**HEADERS, **own}
    if metrics is None:
        metrics = [*DEFAULT_METRICS, *(m for m in own if m not in DEFAULT_METRICS
                                       and metric_column(frame, m) in frame)]
    check_metrics(frame, metrics)
    summary = summarize(frame, keys, metrics) if finished else pd.DataFrame()
    groups = [(_label(row, keys), [r for r in finished
                                   if all(r.value(k) == row[k] for k in keys)])
              for _, row in summary.iterrows()]
    notes = []
    for label, members in groups:
        diff = config_differences(members)
        if diff:
            notes.append(f"group `{label}` mixes runs whose configs differ in "
                         f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}: "
                         "add them to --by to separate them")
        seeds = [r.seed for r in members]
        if len(set(seeds)) < len(seeds):
            notes.append(f"group `{label}` repeats a seed ({', '.join(seeds)})")
    failed = None
    if others:
        failed = pd.DataFrame({"run": [_relative(r.path, out) for r in others],
                               "status": [r.status for r in others],
                               **{k: [r.value(k) for r in others] for k in keys},
                               "seed": [r.seed for r in others],
                               "error": [r.error.replace("|", "\\|") or "-" for r in others]})
    plots = [plot_acc_vs_ece(summary, keys, out / "report_acc_vs_ece.png") if finished else None,
             plot_reliability(groups, out / "report_reliability.png")]
    drawn = method_plots(finished, frame, keys, out)
    differences = None
    if baseline is not None and finished:
        summary = baseline_differences(frame, summary, keys, metrics, baseline)
        differences = difference_table(summary, keys, metrics, baseline, headers)
    return Report(sources=list(sources), finished=len(finished), others=others, keys=keys,
                  metrics=metrics, summary=summary,
                  table=display_table(summary, keys, metrics, headers) if finished else None,
                  failed=failed, notes=notes,
                  plots=[p for p in plots if p is not None] + [path for _, path in drawn],
                  captions={path.stem: plot.caption for plot, path in drawn},
                  run_plots=run_plots(finished, out), baseline=baseline,
                  differences=differences,
                  difference_notes=difference_legend(baseline, [k for k in keys
                                                                if k != "method"])
                  if differences is not None else [])


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def check_keys(runs: list[Run], keys: list[str]) -> None:
    """Every grouping key must be a config key or group of some run."""
    unknown = [k for k in keys if all(r.value(k) == "-" for r in runs)]
    if unknown:
        raise ReportError(f"--by {unknown[0]}: no run has this config key or group")


def check_baseline(runs: list[Run], keys: list[str], baseline: str) -> None:
    """--baseline must name a method of a finished run, and ``method`` must be a key."""
    if "method" not in keys:
        raise ReportError(f"--baseline compares methods, but the grouping keys "
                          f"({','.join(keys)}) leave out method: add it to --by")
    methods = sorted({r.value("method") for r in runs if r.status == "finished"})
    if baseline not in methods:
        raise ReportError(f"--baseline {baseline}: no finished run has method={baseline} "
                          f"(methods: {', '.join(methods) or 'none'})")
