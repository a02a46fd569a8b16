"""``kdlab report PATH... [--by KEYS] [--metric NAMES] [--out DIR]``: many runs, one table.

Finds run directories under each PATH (single runs and multirun trees: a directory with
``.hydra/config.yaml``, or ``config.yaml`` next to ``results.json``/``failed.json``), groups
the finished runs by their configuration minus the seed and prints mean +/- std over the
seeds of each group. Default grouping: ``method`` plus every override (from
``.hydra/overrides.yaml``) whose value differs between runs, except ``seed``; ``--by`` names
the keys instead (config keys such as ``noise.rate``, or config groups such as ``method``).

Metrics are dotted paths into ``results.json`` (``test.acc``, ``test_last.ece``, ``val.nll``,
``mixing.label_weight_noisy``); ``teacher.X`` is ``teachers.0.test.X`` and a bare ``X`` is
``test.X``. ``test`` is the best-on-validation checkpoint, ``test_last`` the last epoch.
std is the sample standard deviation over seeds (n - 1); with one seed there is none.

Failed runs (``failed.json``) and unfinished ones (neither file) are listed in their own
section and never averaged in. Written to ``--out`` (default: the first PATH):
``report.md``, ``report.csv``, ``report_acc_vs_ece.png``, and when the runs hold the data,
``report_reliability.png`` (``results.json`` "reliability" per-bin sums) and
``report_mixing.png`` (ALM-KD's clean vs noisy label weight).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_METRICS = ("test.acc", "test.ece", "test_last.acc", "test_last.ece", "teacher.acc")
HEADERS = {"test.acc": "test acc (best)", "test.ece": "test ECE (best)",
           "test_last.acc": "test acc (last)", "test_last.ece": "test ECE (last)",
           "teacher.acc": "teacher test acc"}
NEVER_GROUP = ("seed",)
SKIP_DIRS = {"wandb", "tensorboard", "logs", "checkpoints"}
# Config parts that differ between machines or runs without changing the experiment.
NOT_THE_EXPERIMENT = ("seed", "paths.", "num_threads", "trainer.enable_progress_bar",
                      "dataset.num_workers", "dataset.root")


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
        if key in self.choices and self.choices[key] is not None:
            return str(self.choices[key])
        found, value = _lookup(self.config, key)
        if found and not isinstance(value, (dict, list)):
            return _fmt_value(value)
        if self.results and not isinstance(self.results.get(key, {}), (dict, list)):
            return _fmt_value(self.results[key])
        if key in self.overrides:
            return self.overrides[key]
        if found:
            return json.dumps(value, sort_keys=True)
        return "-"

    @property
    def seed(self) -> str:
        found, seed = _lookup(self.config, "seed")
        return _fmt_value(seed) if found else "-"


@dataclass
class Group:
    key: tuple[str, ...]
    runs: list[Run]

    def label(self, keys: list[str]) -> str:
        return ", ".join(f"{k}={v}" for k, v in zip(keys, self.key, strict=True))

    def values(self, metric: str) -> list[float]:
        out = []
        for run in self.runs:
            found, v = metric_value(run.results or {}, metric)
            if found and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append(float(v))
        return out


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
    overrides = _load_yaml(d / ".hydra" / "overrides.yaml") or []
    for item in overrides:
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
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text())


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _lookup(data: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return False, None
    return True, data


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def metric_value(results: dict[str, Any], metric: str) -> tuple[bool, Any]:
    if metric.startswith("teacher."):
        metric = "teachers.0.test." + metric[len("teacher."):]
    elif "." not in metric:
        metric = "test." + metric
    return _lookup(results, metric)


# -- grouping ----------------------------------------------------------------------------------


def default_keys(runs: list[Run]) -> list[str]:
    """``method`` plus every override key whose value differs between runs (never the seed)."""
    keys: list[str] = ["method"]
    for run in runs:
        for key in run.overrides:
            if key not in keys and key not in NEVER_GROUP and not key.startswith("hydra"):
                keys.append(key)
    return [k for k in keys if k == "method" or len({r.value(k) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str]) -> list[Group]:
    groups: dict[tuple[str, ...], Group] = {}
    for run in runs:
        key = tuple(run.value(k) for k in keys)
        groups.setdefault(key, Group(key, [])).runs.append(run)
    return list(groups.values())


def config_differences(group: Group) -> list[str]:
    """Config keys (other than the seed and machine paths) that differ inside a group."""
    flat = [_flatten(r.config) for r in group.runs]
    keys = sorted(set().union(*flat)) if flat else []
    return [k for k in keys if not k.startswith(NOT_THE_EXPERIMENT)
            and len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), std


# -- writing -----------------------------------------------------------------------------------


def _cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _seeds(group: Group) -> str:
    return ",".join(r.seed for r in group.runs)


def markdown_table(groups: list[Group], keys: list[str], metrics: list[str]) -> str:
    header = [*keys, "n", "seeds", *(HEADERS.get(m, m) for m in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        row = [*g.key, str(len(g.runs)), _seeds(g), *(_cell(g.values(m)) for m in metrics)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def not_finished_table(runs: list[Run], keys: list[str], base: Path) -> str:
    lines = ["| run | status | " + " | ".join(keys) + " | seed | error |",
             "|" + "---|" * (len(keys) + 4)]
    for r in runs:
        error = r.error.replace("|", "\\|") if r.error else "-"
        lines.append(f"| {_relative(r.path, base)} | {r.status} | "
                     + " | ".join(r.value(k) for k in keys) + f" | {r.seed} | {error} |")
    return "\n".join(lines)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def write_csv(path: Path, groups: list[Group], keys: list[str], metrics: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "n", "seeds", *(f"{m}_{s}" for m in metrics
                                                for s in ("mean", "std", "n"))])
        for g in groups:
            row: list[Any] = [*g.key, len(g.runs), _seeds(g)]
            for m in metrics:
                values = g.values(m)
                mean, std = mean_std(values)
                row += ["" if mean is None else repr(mean), "" if std is None else repr(std),
                        len(values)]
            writer.writerow(row)


# -- plots -------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_acc_vs_ece(groups: list[Group], keys: list[str], path: Path) -> Path | None:
    points = []
    for g in groups:
        acc, acc_sd = mean_std(g.values("test.acc"))
        ece, ece_sd = mean_std(g.values("test.ece"))
        if acc is not None and ece is not None:
            points.append((g.label(keys), ece, ece_sd or 0.0, acc, acc_sd or 0.0))
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, ece, ece_sd, acc, acc_sd in points:
        ax.errorbar(ece, acc, xerr=ece_sd, yerr=acc_sd, fmt="o", capsize=3, label=label)
    ax.set_xlabel("test ECE (best on val; lower is better)")
    ax.set_ylabel("test accuracy (best on val)")
    ax.set_title("accuracy vs calibration: mean ± std over seeds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pooled_reliability(group: Group) -> dict[str, list[float]] | None:
    """Per-bin sums (count, confidence, correct) added over the group's runs; None if any
    run lacks them."""
    total: dict[str, list[float]] | None = None
    for run in group.runs:
        bins = (run.results or {}).get("reliability")
        if not bins or not all(k in bins for k in ("count", "confidence", "correct")):
            return None
        if total is None:
            total = {k: [0.0] * len(bins["count"]) for k in ("count", "confidence", "correct")}
        if len(bins["count"]) != len(total["count"]):
            return None
        for k in total:
            total[k] = [a + float(b) for a, b in zip(total[k], bins[k], strict=False)]
    return total


def plot_reliability(groups: list[Group], keys: list[str], path: Path) -> Path | None:
    pooled = [(g, b) for g in groups if (b := pooled_reliability(g)) is not None]
    if not pooled:
        return None
    plt = _pyplot()
    cols = min(4, len(pooled))
    rows = math.ceil(len(pooled) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[len(pooled):]:
        ax.axis("off")
    for ax, (g, bins) in zip(axes.flat, pooled, strict=False):
        n_bins = len(bins["count"])
        width = 1.0 / n_bins
        total = sum(bins["count"]) or 1.0
        gaps = zip(bins["correct"], bins["confidence"], strict=False)
        ece = sum(abs(c - k) for c, k in gaps) / total
        centers = [(i + 0.5) * width for i in range(n_bins)]
        has = [i for i in range(n_bins) if bins["count"][i] > 0]
        acc = [bins["correct"][i] / bins["count"][i] for i in has]
        conf = [bins["confidence"][i] / bins["count"][i] for i in has]
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        ax.bar([centers[i] for i in has], acc, width=width, color="#4C72B0", edgecolor="black")
        ax.plot(conf, acc, ".", color="#DD8452", label="mean confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{g.label(keys)}\nn={len(g.runs)}, pooled ECE={ece:.4f}", fontsize=8)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    fig.suptitle("reliability on test (best on val), bins pooled over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_mixing(groups: list[Group], keys: list[str], path: Path) -> Path | None:
    rows = []
    for g in groups:
        clean = g.values("mixing.label_weight_clean")
        noisy = g.values("mixing.label_weight_noisy")
        if clean or noisy:
            rows.append((g.label(keys), mean_std(clean), mean_std(noisy)))
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(rows) + 2), 4))
    x = range(len(rows))
    for offset, idx, name, color in ((-0.2, 1, "clean examples", "#55A868"),
                                     (0.2, 2, "noisy examples", "#C44E52")):
        means = [r[idx][0] if r[idx][0] is not None else 0.0 for r in rows]
        sds = [r[idx][1] or 0.0 for r in rows]
        ax.bar([i + offset for i in x], means, width=0.4, yerr=sds, capsize=3, color=color,
               label=name)
    ax.set_xticks(list(x))
    ax.set_xticklabels([r[0] for r in rows], fontsize=7, rotation=15, ha="right")
    ax.set_ylabel("mean weight on the given label")
    ax.set_title("ALM-KD mixing: label weight, clean vs noisy (mean ± std over seeds)",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- the command -------------------------------------------------------------------------------


def _comma_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kdlab report",
        description="Tabulate run directories (single runs and multirun trees): mean +/- std "
                    "over seeds for every group of runs that differ only in the seed. Failed and "
                    "unfinished runs are listed, never averaged in. Writes report.md, report.csv "
                    "and report_*.png.",
        epilog="Metrics are dotted paths into results.json: test.acc (best-on-val checkpoint), "
               "test_last.ece (last epoch), val.nll, mixing.label_weight_noisy, ...; "
               "teacher.X = teachers.0.test.X; a bare name X = test.X.")
    parser.add_argument("paths", nargs="+", type=Path, metavar="PATH",
                        help="run directories or trees of them (multirun sweep dirs)")
    parser.add_argument("--by", type=_comma_list, default=None, metavar="KEYS",
                        help="grouping keys, comma-separated (e.g. method,noise.rate); "
                             "default: method + the overrides that vary, minus seed")
    parser.add_argument("--metric", type=_comma_list, default=list(DEFAULT_METRICS),
                        metavar="NAMES", help="results.json paths, comma-separated "
                        f"(default: {','.join(DEFAULT_METRICS)})")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where report.md, report.csv and plots go (default: first PATH)")
    return parser.parse_args(argv)


def build_report(runs: list[Run], keys: list[str], metrics: list[str], out: Path,
                 sources: list[Path]) -> tuple[str, list[Group]]:
    finished = [r for r in runs if r.status == "finished"]
    others = [r for r in runs if r.status != "finished"]
    groups = group_runs(finished, keys)
    lines = ["# kdlab report", "",
             "Runs under: " + ", ".join(f"`{p}`" for p in sources), "",
             f"{len(finished)} finished runs in {len(groups)} groups; {len(others)} failed or "
             f"unfinished{' (listed below, not averaged)' if others else ''}.", "",
             "mean ± sample std over seeds; best = checkpoint with the best val/acc, "
             "last = last epoch; accuracy and ECE (15 bins) are fractions.", ""]
    if groups:
        lines += [markdown_table(groups, keys, metrics), ""]
    for g in groups:
        diff = config_differences(g)
        if diff:
            lines.append(f"- note: group `{g.label(keys)}` mixes runs whose configs differ in "
                         f"{', '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}: "
                         "add them to --by to separate them")
        seeds = [r.seed for r in g.runs]
        if len(set(seeds)) < len(seeds):
            lines.append(f"- note: group `{g.label(keys)}` repeats a seed ({', '.join(seeds)})")
    if others:
        lines += ["", "## Failed or unfinished runs", "",
                  not_finished_table(others, keys, out), ""]
    plots = [plot_acc_vs_ece(groups, keys, out / "report_acc_vs_ece.png"),
             plot_reliability(groups, keys, out / "report_reliability.png"),
             plot_mixing(groups, keys, out / "report_mixing.png")]
    plots = [p for p in plots if p is not None]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines).rstrip() + "\n", groups


def main(argv: list[str] | None = None) -> None:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    missing = [p for p in args.paths if not p.is_dir()]
    if missing:
        _fail(f"not a directory: {missing[0]}")
    runs = find_runs(args.paths)
    if not runs:
        _fail(f"no run directories (with .hydra/config.yaml or config.yaml) under "
              f"{', '.join(map(str, args.paths))}")
    keys = args.by or default_keys(runs)
    unknown = [k for k in keys if all(r.value(k) == "-" for r in runs)]
    if unknown:
        _fail(f"--by {unknown[0]}: no run has this config key or group")
    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    text, groups = build_report(runs, keys, args.metric, out, args.paths)
    (out / "report.md").write_text(text)
    write_csv(out / "report.csv", groups, keys, args.metric)
    print(text)
    print(f"wrote {out / 'report.md'} and {out / 'report.csv'}")


def _fail(message: str) -> None:
    print(f"kdlab report: error: {message}", file=sys.stderr)
    raise SystemExit(2)
